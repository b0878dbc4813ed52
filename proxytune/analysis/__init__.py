"""What the results mean: the metrics and the student's gains, feature spread, the paper's
numbers, the HTML report, the DreamBench-wide table and the user-study kit. Plain computations
over scores, features and evaluation folders; it imports `core` only, never a stage or a model."""

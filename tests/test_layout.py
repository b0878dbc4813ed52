"""The layout's rules (README, "How it is built"): layers import only what is below them, only
the operations and the CLI touch KFP, the components call only the steps face, no import
cycle, and module paths that written artifacts import still resolve."""

import ast
import importlib
import warnings
from pathlib import Path

import pytest
from layering import cycles, imports, modules, violations

REPO = Path(__file__).resolve().parents[1]
BELOW_STAGES = ("proxytune.core", "proxytune.backends", "proxytune.analysis", "proxytune.serving")
LIBRARY = (*BELOW_STAGES, "proxytune.stages")
RULES = {
    "proxytune": (),
    "proxytune.core": (),
    "proxytune.backends": ("proxytune.core",),
    "proxytune.analysis": ("proxytune.core",),
    "proxytune.serving": ("proxytune.core", "proxytune.backends"),
    "proxytune.stages": BELOW_STAGES,
    "components": ("proxytune.stages.steps",),
    "pipelines": ("components", "proxytune.core", "proxytune.backends", "proxytune.stages"),
    "proxytune.ops": (*LIBRARY, "components", "pipelines"),
    "proxytune.cli": (*LIBRARY, "proxytune.ops", "components", "pipelines"),
}
# the steps face is a layer of its own above the stages: all the components may import
RULES["proxytune.stages.steps"] = (*BELOW_STAGES, "proxytune.stages")
KFP_USERS = {"proxytune.ops": (), "proxytune.cli": (), "components": (), "pipelines": ()}
LONG_MODULES = 400  # lines; a longer module says in its docstring why it stays whole


def test_every_module_imports_only_the_layers_below_it():
    assert violations(REPO, RULES, {"kfp": KFP_USERS}) == []


def test_no_import_cycle_among_modules():
    assert cycles(REPO, ["proxytune", "components", "pipelines"]) == []


def test_the_layers_themselves_form_no_cycle():
    order = []  # a topological order exists only for an acyclic graph
    pending = dict(RULES)
    while pending:
        ready = [layer for layer, below in pending.items() if all(b in order or b == layer for b in below)]
        assert ready, f"the layer rules have a cycle among {sorted(pending)}"
        order += ready
        for layer in ready:
            del pending[layer]


def test_each_subpackage_says_what_it_holds_and_may_import():
    for package in ("core", "backends", "stages", "analysis", "serving", "ops", "cli"):
        doc = ast.get_docstring(ast.parse((REPO / "proxytune" / package / "__init__.py").read_text()))
        assert doc and "import" in doc, f"proxytune/{package}/__init__.py: say what it holds and may import"


def test_long_modules_say_why_they_stay_whole():
    for path in modules(REPO, ["proxytune", "components", "pipelines"]).values():
        source = path.read_text()
        if source.count("\n") > LONG_MODULES:
            doc = ast.get_docstring(ast.parse(source)) or ""
            assert "one piece" in doc, f"{path}: over {LONG_MODULES} lines; split it or say why not"


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)


SYNTHETIC_RULES = {
    "pkg": (),
    "pkg.core": (),
    "pkg.stages": ("pkg.core",),
    "pkg.cli": ("pkg.core", "pkg.stages"),
}


def test_the_checker_names_an_import_that_breaks_the_rules(tmp_path):
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/core/__init__.py": "",
            "pkg/core/store.py": "import json\n\n\ndef load():\n    from pkg.stages.ingest import ingest\n",
            "pkg/stages/__init__.py": "",
            "pkg/stages/ingest.py": "from ..core import store\nimport kfp\n\ningest = store\n",
            "pkg/cli/__init__.py": "from pkg import stages\nfrom pkg.core.store import load\nimport kfp\n",
            "pkg/stray.py": "",
        },
    )
    found = violations(tmp_path, SYNTHETIC_RULES, {"kfp": ("pkg.cli",)})
    assert found == [
        f"{tmp_path / 'pkg/stray.py'}: pkg.stray is in no layer",
        f"{tmp_path / 'pkg/core/store.py'}:5: pkg.core.store imports pkg.stages.ingest: pkg.core may not "
        "import pkg.stages",
        f"{tmp_path / 'pkg/stages/ingest.py'}:2: pkg.stages.ingest imports kfp: only pkg.cli may import kfp",
    ]


def test_the_checker_resolves_relative_imports_and_submodules(tmp_path):
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/core/__init__.py": "from . import store\nfrom .store import load\n",
            "pkg/core/store.py": "from .. import core\n",
        },
    )
    known = modules(tmp_path, ["pkg"])
    found = [i.imported for i in imports("pkg.core", known["pkg.core"], known)]
    assert found == ["pkg.core.store", "pkg.core.store"]
    assert [i.imported for i in imports("pkg.core.store", known["pkg.core.store"], known)] == ["pkg.core"]


def test_the_checker_finds_an_import_cycle(tmp_path):
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "def later():\n    from pkg.c import x\n",
            "pkg/c.py": "import pkg.a\n",
            "pkg/d.py": "import pkg.a\n",
        },
    )
    assert cycles(tmp_path, ["pkg"]) == [["pkg.a", "pkg.b", "pkg.c"]]


# What artifacts written before the layered layout import: every component of a compiled
# pipeline (`from proxytune.steps import X_step` and `TrackingContext` from proxytune.tracking),
# and the code MLflow runs to load a model registered then (its serving module).
WRITTEN_ARTIFACT_IMPORTS = [
    *(
        ("proxytune.steps", f"{step}_step", "proxytune.stages.steps")
        for step in (
            "plan",
            "plan_bench",
            "ingest",
            "tune_supervisor",
            "proxy_shards",
            "generate_proxy",
            "merge_proxy",
            "tune_student",
            "tune_direct",
            "evaluate",
            "register",
            "aggregate",
        )
    ),
    ("proxytune.tracking", "TrackingContext", "proxytune.core.tracking"),
    ("proxytune.registration", "ADAPTER_ARTIFACT", "proxytune.core.contracts"),
    ("proxytune.student", "load_student", "proxytune.backends._tuned"),
    ("proxytune.images", "png_bytes", "proxytune.core.images"),
]


@pytest.mark.parametrize(("old", "name", "new"), WRITTEN_ARTIFACT_IMPORTS)
def test_old_module_paths_that_artifacts_import_still_resolve(old, name, new):
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} is now {new}\.{name}"):
        found = getattr(importlib.import_module(old), name)
    assert found is getattr(importlib.import_module(new), name)


def test_an_old_module_path_names_where_it_moved_when_a_name_is_gone():
    legacy = importlib.import_module("proxytune.tracking")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match=r"proxytune\.tracking.*moved to proxytune\.core\.tracking"):
            legacy.no_such_name  # noqa: B018
    with pytest.raises(ImportError, match="no_such_name"):
        exec("from proxytune.tracking import no_such_name", {})


def test_the_registered_model_code_is_the_serving_module():
    """A registered version's MLmodel records the served model's file by path (MLflow "models
    from code") and ships the package beside it: that file is `proxytune/serving/model.py`."""
    from proxytune.serving import model

    assert Path(model.__file__) == REPO / "proxytune" / "serving" / "model.py"
    assert model.StudentModel.__module__ == "proxytune.serving.model"

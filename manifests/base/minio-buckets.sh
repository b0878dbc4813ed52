#!/bin/sh
# Creates the buckets `$S3_BUCKET` (pipeline: datasets, checkpoints, weights) and
# `$MLFLOW_BUCKET` (MLflow artifacts), and the pipeline's own MinIO user (the Secret
# proxytune-s3) limited to `$S3_BUCKET`. Safe to run any number of times.
set -eu

for value in "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" "$S3_ACCESS_KEY" "$S3_SECRET_KEY"; do
  case "$value" in
    *CHANGE-ME*)
      echo "minio-buckets: a Secret still holds the placeholder values of the *.env.example files" >&2
      exit 1
      ;;
  esac
done

tries=0
# `alias set` fails while MinIO is unreachable; `mc ready` then waits for quorum.
until mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1 \
  && mc ready local >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 100 ]; then
    echo "minio-buckets: MinIO at $MINIO_URL not ready after 5 minutes" >&2
    exit 1
  fi
  sleep 3
done

mc mb --ignore-existing "local/$S3_BUCKET" "local/$MLFLOW_BUCKET"

if [ "$S3_ACCESS_KEY" = "$MINIO_ROOT_USER" ]; then
  echo "minio-buckets: proxytune-s3 holds the root credentials, so no pipeline user is made (not recommended)"
  exit 0
fi

policy="${TMPDIR:-/tmp}/pipeline-policy.json"
cat > "$policy" <<POLICY
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::$S3_BUCKET"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                 "s3:ListMultipartUploadParts"],
      "Resource": ["arn:aws:s3:::$S3_BUCKET/*"]
    }
  ]
}
POLICY
mc admin policy create local proxytune-pipeline "$policy"
mc admin user add local "$S3_ACCESS_KEY" "$S3_SECRET_KEY"
if ! out=$(mc admin policy attach local proxytune-pipeline --user "$S3_ACCESS_KEY" 2>&1); then
  case "$out" in
    *"already in effect"* | *"no net effect"*) ;; # attached on an earlier run
    *)
      echo "$out" >&2
      exit 1
      ;;
  esac
fi
echo "minio-buckets: buckets $S3_BUCKET and $MLFLOW_BUCKET ready; user $S3_ACCESS_KEY may use $S3_BUCKET"

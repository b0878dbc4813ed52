"""`proxytune upload`: put the compiled pipeline into Kubeflow Pipelines, as a new pipeline or
as a new version of the one already there under that name.

The pipeline is compiled here with the given cluster options (image, resources, GPU pool),
so what is uploaded is what `proxytune compile` would write. A token for an authenticated
Kubeflow (multi-user, behind an identity proxy) is read from `KF_PIPELINES_TOKEN`, never
from the command line.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from packaging.version import InvalidVersion, Version

from pipelines.cluster import ClusterOptions
from pipelines.proxy_tuning import BENCH_NAME, PIPELINE_NAME, compile_pipeline

if TYPE_CHECKING:
    import kfp

log = logging.getLogger(__name__)
TOKEN_ENV = "KF_PIPELINES_TOKEN"
# The oldest Kubeflow Pipelines backend that runs the compiled pipeline: 2.15 honours an
# optional Secret in an env var (the hub token, `proxytune-hf`: older backends fail every model
# step when it is absent); artifact `dsl.Collected` and retry policies need 2.14.
MIN_BACKEND = "2.15.0"
DESCRIPTIONS = {PIPELINE_NAME: "Proxy-Tuning", BENCH_NAME: "Proxy-Tuning over DreamBench"}


@dataclass(frozen=True)
class Upload:
    pipeline_id: str
    version_id: str | None  # None: the first upload (KFP makes its first version itself)
    version_name: str
    new_pipeline: bool


def upload(
    host: str,
    cluster: ClusterOptions,
    name: str = PIPELINE_NAME,
    version: str | None = None,
    namespace: str | None = None,
    pipeline: str = PIPELINE_NAME,
) -> Upload:
    """Compile `pipeline` (proxy-tuning or dreambench) and upload it as `name`; raises
    ValueError with the reason when Kubeflow refuses or is unreachable."""
    check_host(host)
    version = version or _version_name(cluster.image)
    with tempfile.TemporaryDirectory(prefix="proxytune-upload-") as tmp:
        package = compile_pipeline(str(Path(tmp) / "pipeline.yaml"), cluster, pipeline)
        description = f"{DESCRIPTIONS[pipeline]}, image {cluster.image}"
        with kubeflow(host, "the upload") as client:
            pipeline_id = client.get_pipeline_id(name)
            if pipeline_id is None:
                created = client.upload_pipeline(package, name, description, namespace=namespace)
                return Upload(created.pipeline_id, None, version, new_pipeline=True)
            added = client.upload_pipeline_version(
                package, version, pipeline_id=pipeline_id, description=description
            )
            return Upload(pipeline_id, added.pipeline_version_id, version, new_pipeline=False)


def check_host(host: str) -> None:
    """Refuse a host that is not a URL before anything is compiled or sent."""
    parsed = urlparse(host)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"--host must be the Kubeflow Pipelines URL, http(s)://host[:port], got {host!r}")


@contextlib.contextmanager
def kubeflow(host: str, action: str) -> Iterator[kfp.Client]:
    """A kfp client of `host` (token from `$KF_PIPELINES_TOKEN`); inside, Kubeflow's refusals
    and network errors become ValueError naming `action` (the CLI's clear-error path)."""
    import kfp
    import urllib3
    from kfp_server_api import ApiException

    check_host(host)
    try:
        client = kfp.Client(host=host, existing_token=os.environ.get(TOKEN_ENV) or None)
        check_backend_version(host, backend_version(client))
        yield client
    except ApiException as error:
        raise ValueError(
            f"Kubeflow Pipelines at {host} refused {action}: {error.status} {error.reason}"
            + (f" ({error.body.strip()[:300]})" if error.body else "")
        ) from None
    except urllib3.exceptions.HTTPError as error:
        raise ValueError(f"cannot reach Kubeflow Pipelines at {host}: {error}") from None


def backend_version(client: kfp.Client) -> str:
    """The backend's release as its healthz reports it (`tag_name`, e.g. "2.15.0"), read raw:
    kfp_server_api's healthz model keeps only `multi_user` and drops the rest."""
    reply = client._healthz_api.healthz_service_get_healthz(_preload_content=False)
    return str(json.loads(reply.data or b"{}").get("tag_name") or "unknown")


def check_backend_version(host: str, version: str) -> None:
    """Refuse a backend older than MIN_BACKEND before anything is sent; one that does not say
    (a development build reports "unknown") is let through with a warning."""
    try:
        found = Version(version.removeprefix("v"))
    except InvalidVersion:
        log.warning("Kubeflow Pipelines at %s reports version %r; needs %s+", host, version, MIN_BACKEND)
        return
    if found < Version(MIN_BACKEND):
        raise ValueError(
            f"Kubeflow Pipelines at {host} is version {version}; the compiled pipeline needs "
            f"{MIN_BACKEND} or later (optional Secrets in env vars): upgrade the backend"
        )


def _version_name(image: str) -> str:
    """`<image tag>-<UTC time>`: names are unique per pipeline and say what they run."""
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else "latest"
    return f"{tag}-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}"

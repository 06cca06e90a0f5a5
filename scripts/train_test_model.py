#!/usr/bin/env python3
"""Trains the small DeepseekV3 that quality tests quantize (tests/data/ds3-trained/).

Random weights hide what GPTQ and AWQ do: every column looks alike, so a smarter method has
nothing to find. This model is trained, briefly, on mq's own sources, so its weights and
activations have the structure of a real language model (outlier channels, skewed experts).

Two steps:
  prepare  (any machine)  splits mq's files into train / validation / held-out by a hash of
                          their path, adds Python's standard library to the training text,
                          trains a byte-level BPE tokenizer on it, and writes token ids and
                          the held-out text (mq's own files only) to --work.
  train    (a GPU)        trains the model on the train ids for --minutes, keeps the weights
                          with the best validation loss, reports held-out perplexity, and
                          writes a transformers checkpoint (bf16, one safetensors file).

  python3 scripts/train_test_model.py prepare --work .trainwork
  python3 scripts/train_test_model.py train --work .trainwork --out OUT --minutes 6

Architecture: hidden 256, 1 dense + 2 MoE layers (16 routed experts in 4 groups, top-4 from the
2 best groups, 1 shared expert), MLA attention (q_lora_rank 128, kv_lora_rank 128), vocabulary
4096. Every linear's input width is a multiple of 128, so every target set quantizes with group
size 128.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

TEXT_SUFFIXES = {".cc", ".h", ".cu", ".py", ".proto", ".md", ".sh", ".txt", ".yaml", ".cmake"}
VOCAB = 4096
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>"]


def split_of(path):
    """0..9 from the path's hash: 0 is held out (shipped for tests), 1 is validation."""
    return hashlib.sha256(path.encode()).digest()[0] % 10


def collect(root):
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or p.suffix not in TEXT_SUFFIXES:
            continue
        if rel.startswith(("build", ".", "tests/data/")) or "/." in rel:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        files.append((rel, text))
    return files


def extra_text(limit_bytes):
    """Python's own standard library sources (PSF license), up to `limit_bytes`: more training
    text than mq's sources alone, of the same kind (code and its comments)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for p in sorted(lib.rglob("*.py")):
        rel = p.relative_to(lib).as_posix()
        if rel.startswith(("test/", "idlelib/", "site-packages/", "lib2to3/tests")):
            continue
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(t) > limit_bytes:
            break
        texts.append(t)
        total += len(t)
    return texts


def prepare(args):
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = Path(args.source).resolve()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = collect(root)
    parts = {"train": [], "valid": [], "heldout": []}
    for rel, text in files:
        s = split_of(rel)
        parts["heldout" if s == 0 else "valid" if s == 1 else "train"].append(text)
    parts["train"].extend(extra_text(args.extra_bytes))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(parts["train"], trainer=trainer)
    tok.save(str(work / "tokenizer.json"))
    bos = tok.token_to_id(SPECIAL[0])
    eos = tok.token_to_id(SPECIAL[1])
    for name, texts in parts.items():
        ids = []
        for t in texts:
            ids.append(bos)
            ids.extend(tok.encode(t).ids)
            ids.append(eos)
        np.save(work / f"{name}.npy", np.asarray(ids, dtype=np.uint16))
        print(f"{name}: {len(texts)} files, {len(ids)} tokens")
    (work / "heldout.txt").write_text("\n\n".join(parts["heldout"]), encoding="utf-8")
    (work / "special.json").write_text(json.dumps({"bos": bos, "eos": eos}))


def config_dict(special):
    return dict(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024,
        num_nextn_predict_layers=0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=special["bos"], eos_token_id=special["eos"])


def batches(ids, seq, batch, gen, torch):
    n = (len(ids) - 1) // seq
    starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
    x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
    y = torch.stack([ids[s + 1:s + seq + 1] for s in starts.tolist()])
    return x, y, n


def evaluate(model, ids, seq, device, torch):
    """Mean next-token loss over non-overlapping windows of `ids`."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - seq - 1, seq):
            x = ids[s:s + seq].unsqueeze(0).to(device)
            y = ids[s + 1:s + seq + 1].unsqueeze(0).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device != "cpu"):
                logits = model(input_ids=x).logits.float()
            total += torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
            count += y.numel()
    model.train()
    return total / max(count, 1)


def train(args):
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    work = Path(args.work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    special = json.loads((work / "special.json").read_text())
    ids = {k: torch.from_numpy(np.load(work / f"{k}.npy").astype(np.int64))
           for k in ("train", "valid", "heldout")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = DeepseekV3Config(**config_dict(special))
    model = DeepseekV3ForCausalLM(cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    log = open(out / "train_log.txt", "w")

    def say(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    say(f"params {params}, train tokens {len(ids['train'])}, valid {len(ids['valid'])}, "
        f"heldout {len(ids['heldout'])}, device {device}")
    deadline = time.monotonic() + args.minutes * 60
    best, best_state, step = float("inf"), None, 0
    warmup = 200
    while time.monotonic() < deadline and step < args.max_steps:
        lr = args.lr * min(1.0, (step + 1) / warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y, _ = batches(ids["train"], args.seq, args.batch, gen, torch)
        x, y = x.to(device), y.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device != "cpu"):
            logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            v = evaluate(model, ids["valid"], args.seq, device, torch)
            say(f"step {step} train {loss.item():.3f} valid {v:.3f} (ppl {math.exp(v):.2f})")
            if v < best:
                best = v
                best_state = {k: t.detach().to("cpu", copy=True) for k, t in
                              model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    held = evaluate(model, ids["heldout"], args.seq, device, torch)
    say(f"done after {step} steps: best valid loss {best:.4f}, held-out loss {held:.4f} "
        f"(ppl {math.exp(held):.2f}) at sequence length {args.seq}")
    model = model.to(torch.bfloat16).cpu()
    model.config.dtype = "bfloat16"
    model.save_pretrained(out)
    summary = dict(steps=step, params=params, seq=args.seq, batch=args.batch, lr=args.lr,
                   valid_loss=best, heldout_loss=held, heldout_ppl=math.exp(held),
                   torch=torch.__version__, device=torch.cuda.get_device_name(0)
                   if device == "cuda" else "cpu")
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--work", required=True)
    p.add_argument("--extra-bytes", type=int, default=24 << 20,
                   help="bytes of Python standard library sources added to the training text")
    t = sub.add_parser("train")
    t.add_argument("--work", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--minutes", type=float, default=6)
    t.add_argument("--max-steps", type=int, default=100000)
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prepare(args) if args.cmd == "prepare" else train(args)


if __name__ == "__main__":
    sys.exit(main())

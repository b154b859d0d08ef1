"""The peer: transformers + PEFT in a plain loop, typical or tuned.

typical (default), as its users write it: padding to max_length, fp32, the model's own
attention dropout (0.1), AdamW's default (foreach) implementation.
--tuned, as a careful user writes it: bf16 autocast where the CPU has AMX/AVX512-BF16
(`--precision flags`; `--precision fp32|bf16` sets it: bench.py gives the tuned peer the
precision lorafit's run measured faster and used), batches grouped by length (the Trainer's LengthGroupedSampler,
`group_by_length`) and padded to their longest review (DataCollatorWithPadding),
attention dropout as lorafit's (--attn-dropout, default 0), fused AdamW.

Run by benchmarks/bench.py in its own process (so its peak memory is its own); prints
one JSON line: samples/s, tokens/s (real, non-pad tokens), wall time, peak RSS, test
accuracy, the training loss per epoch. Same data (lorafit.data.load_dataset with the
same arguments), model, max_length, epochs, batch size, learning rate, schedule
(linear warm-up over --warmup-ratio of the steps, then linear decay; --constant-lr:
none) and clipping (1.0) as lorafit's run.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_constant_schedule,
    get_linear_schedule_with_warmup,
)
from transformers.trainer_pt_utils import LengthGroupedSampler

from lorafit.data import load_dataset
from lorafit.models import resolve_model_path
from lorafit.machine import cpu_has_bf16


def make_model(strategy: str, tuned: bool, attn_dropout: float = 0.0):
    """The peer's model for `strategy` (the default model; for lora, PEFT LoRA with lorafit's
    default rank, alpha and adapted modules, every linear layer of the encoder, and the
    classifier trained fully as PEFT's `modules_to_save`; pooler and classifier trainable for
    last-two-layers) and its tokenizer. `tuned`: attention dropout `attn_dropout`, else the
    model's own."""
    path = resolve_model_path(None)
    tok = AutoTokenizer.from_pretrained(path)
    extra = {"attention_probs_dropout_prob": attn_dropout} if tuned else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **extra)
    if strategy == "lora":
        from peft import LoraConfig, get_peft_model

        from lorafit.config import RunConfig
        from lorafit.strategies import lora_config
        from lorafit.targets import resolve_targets

        ours = lora_config(RunConfig())  # the modules lorafit's default adapts, named for PEFT
        model = get_peft_model(model, LoraConfig(r=ours.r, lora_alpha=ours.alpha,
                                                 target_modules=resolve_targets(model, ours.targets),
                                                 modules_to_save=ours.train_modules or None))
    elif strategy == "last-two-layers":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(("bert.pooler.dense.", "classifier."))
    return model, tok


def make_optimizer(params: list, lr: float, tuned: bool, total: int, warmup_ratio: float = 0.1,
                   constant_lr: bool = False):
    """AdamW (weight decay 0.01 on every parameter; fused when `tuned`, else the default
    foreach) and its schedule over `total` steps: linear warm-up then decay, or constant."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, **({"fused": True} if tuned else {}))
    sched = (get_constant_schedule(opt) if constant_lr
             else get_linear_schedule_with_warmup(opt, int(warmup_ratio * total), total))
    return opt, sched


def train_step(model, params: list, opt, sched, batch: dict, autocast) -> torch.Tensor:
    """One step on `batch` (input_ids and attention_mask (B, T), labels (B,)): forward under
    `autocast`, cross-entropy, backward, clip to 1.0, AdamW and schedule; the loss."""
    with autocast:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--train-size", type=int, required=True)
    ap.add_argument("--val-size", type=int, required=True)
    ap.add_argument("--test-size", type=int, required=True)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tuned", action="store_true")
    ap.add_argument("--attn-dropout", type=float, default=0.0, help="with --tuned")
    ap.add_argument("--precision", choices=("flags", "fp32", "bf16"), default="flags",
                    help="with --tuned: bf16 autocast where the CPU has the bf16 flags (flags), or as given")
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--constant-lr", action="store_true")
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    d = load_dataset(args.data, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                     seed=args.seed)
    model, tok = make_model(args.strategy, args.tuned, args.attn_dropout)
    bf16 = args.tuned and (args.precision == "bf16" or (args.precision == "flags" and cpu_has_bf16()))

    if args.tuned:
        collate = DataCollatorWithPadding(tok)

        def loader_of(split, train: bool):
            enc = tok(split.texts, truncation=True, max_length=args.max_length)
            rows = [{"input_ids": i, "attention_mask": m, "labels": int(y)}
                    for i, m, y in zip(enc["input_ids"], enc["attention_mask"], split.labels)]
            lengths = [len(r["input_ids"]) for r in rows]
            sampler = (LengthGroupedSampler(args.batch_size, lengths=lengths,
                                            generator=torch.Generator().manual_seed(args.seed)) if train
                       else sorted(range(len(rows)), key=lengths.__getitem__))
            return DataLoader(rows, batch_size=args.batch_size if train else 64, sampler=sampler,
                              collate_fn=collate)
    else:
        def loader_of(split, train: bool):
            enc = tok(split.texts, truncation=True, max_length=args.max_length, padding="max_length",
                      return_tensors="pt")
            ds = TensorDataset(enc["input_ids"], enc["attention_mask"], torch.as_tensor(split.labels))
            return DataLoader(ds, batch_size=args.batch_size if train else 64, shuffle=train,
                              generator=torch.Generator().manual_seed(args.seed),
                              collate_fn=lambda b: dict(zip(("input_ids", "attention_mask", "labels"),
                                                            map(torch.stack, zip(*b)))))

    loader, test_loader = loader_of(d.train, True), loader_of(d.test, False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, args.lr, args.tuned, args.epochs * len(loader), args.warmup_ratio,
                                args.constant_lr)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    model.train()
    t0 = time.perf_counter()
    seen = tokens = 0
    epoch_losses, epoch_seconds, epoch_samples = [], [], []
    for _ in range(args.epochs):
        loss_sum, n, t_epoch = 0.0, 0, time.perf_counter()
        for batch in loader:
            loss = train_step(model, params, opt, sched, batch, autocast)
            seen += len(batch["labels"])
            tokens += int(batch["attention_mask"].sum())
            loss_sum, n = loss_sum + loss.item() * len(batch["labels"]), n + len(batch["labels"])
        epoch_losses.append(loss_sum / n)
        epoch_seconds.append(time.perf_counter() - t_epoch)
        epoch_samples.append(n)
    train_s = time.perf_counter() - t0
    model.eval()
    t1 = time.perf_counter()
    correct = 0
    with torch.no_grad(), autocast:
        for batch in test_loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    test_s = time.perf_counter() - t1
    test_n = len(d.test)
    print(json.dumps({
        "strategy": args.strategy, "train_seconds": train_s, "test_seconds": test_s,
        "wall_seconds": time.perf_counter() - t_start, "samples_per_s": seen / train_s,
        "tokens_per_s": tokens / train_s, "test_accuracy": correct / test_n, "train_loss": epoch_losses,
        "epoch_seconds": epoch_seconds, "epoch_samples": epoch_samples,
        "tuned": args.tuned, "bf16": bf16, "seed": args.seed, "lr": args.lr, "constant_lr": args.constant_lr,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()

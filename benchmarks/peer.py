"""The peer, as its users write it: transformers + PEFT, padding to max_length, fp32, a plain loop.

Run by benchmarks/bench.py in its own process (so its peak memory is its own); prints
one JSON line: samples/s, tokens/s (real, non-pad tokens), wall time, peak RSS, test
accuracy. Same data (lorafit.data.load_dataset with the same arguments), model,
max_length, epochs, batch size and learning rates as lorafit's run.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from lorafit.data import load_dataset
from lorafit.models import resolve_model_path


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
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    d = load_dataset(args.data, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                     seed=args.seed)
    path = resolve_model_path(None)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if args.strategy == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["key", "value", "classifier"]))
    elif args.strategy == "last-two-layers":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(("bert.pooler.dense.", "classifier."))

    def tensors(split):
        enc = tok(split.texts, truncation=True, max_length=args.max_length, padding="max_length",
                  return_tensors="pt")
        return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.as_tensor(split.labels))

    train_ds, test_ds = tensors(d.train), tensors(d.test)
    loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    total = args.epochs * len(loader)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * total), total)
    model.train()
    t0 = time.perf_counter()
    seen = tokens = 0
    for _ in range(args.epochs):
        for ids, mask, labels in loader:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            seen += len(labels)
            tokens += int(mask.sum())
    train_s = time.perf_counter() - t0
    model.eval()
    t1 = time.perf_counter()
    correct = 0
    with torch.no_grad():
        for ids, mask, labels in DataLoader(test_ds, batch_size=64):
            correct += int((model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).sum())
    test_s = time.perf_counter() - t1
    print(json.dumps({
        "strategy": args.strategy, "train_seconds": train_s, "test_seconds": test_s,
        "wall_seconds": time.perf_counter() - t_start, "samples_per_s": seen / train_s,
        "tokens_per_s": tokens / train_s, "test_accuracy": correct / len(test_ds),
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()

"""Writes the example notebooks (without outputs) from the cells below:

    .venv/bin/python examples/build_notebooks.py

tests/test_examples.py executes them on a tiny slice, so they cannot rot.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

LORA_FROM_SCRATCH = [
    new_markdown_cell("""# LoRA from scratch

Low-Rank Adaptation (Hu et al. 2021) freezes a pretrained weight `W0` (out x in) and
learns a low-rank update next to it:

    h = W0 x + (alpha / r) * B A x        A: (r x in), B: (out x r), r << min(in, out)

`B` starts at zero, so at initialisation the adapted layer computes exactly what the
pretrained layer does; only `A` and `B` train. This notebook builds the layer step by
step, puts lorafit's own `LoRALinear` beside it, counts what trains in a real encoder
(all-MiniLM-L6-v2) and merges the update into the weights for inference."""),
    new_code_cell("""import math

import torch
from torch import nn

import lorafit

torch.manual_seed(0)"""),
    new_markdown_cell("## 1. The layer, in a dozen lines"),
    new_code_cell("""class MyLoRALinear(nn.Module):
    \"\"\"A frozen nn.Linear plus (alpha / r) B A: x (..., in) -> (..., out).\"\"\"

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)  # the pretrained weight stays frozen
        self.A = nn.Parameter(torch.empty(r, base.in_features))  # (r, in)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))  # (out, r): zero, so the update starts at 0
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.A.T) @ self.B.T


base = nn.Linear(384, 384)
mine = MyLoRALinear(base)
x = torch.randn(2, 7, 384)  # (batch, tokens, hidden)
assert torch.equal(mine(x), base(x))  # B = 0: the adapted layer is the pretrained layer
trainable = sum(p.numel() for p in mine.parameters() if p.requires_grad)
print(f"trainable {trainable:,} of {sum(p.numel() for p in mine.parameters()):,}")  # A and B: 2 x 4 x 384"""),
    new_markdown_cell("""## 2. lorafit's layer beside it

`lorafit.LoRALinear` wraps the same frozen `nn.Linear` (it holds it, it does not inherit
from it). Given the same `A` and `B` it computes the same output."""),
    new_code_cell("""theirs = lorafit.LoRALinear.from_linear(base, lorafit.LoRAConfig(r=4, alpha=8.0))
with torch.no_grad():
    mine.B.normal_()  # a trained-looking B, so the update is not zero
    theirs.lora_A.copy_(mine.A)
    theirs.lora_B.copy_(mine.B)
torch.testing.assert_close(theirs(x), mine(x), atol=1e-5, rtol=0)
print(theirs)"""),
    new_markdown_cell("""## 3. A real encoder: what trains

The seed experiment's setting: rank 4, alpha 8, on the attention key and value
projections and on the last classifier layer."""),
    new_code_cell("""from lorafit.models import load_model

loaded = load_model(None, num_labels=2, seed=0)  # all-MiniLM-L6-v2, embedded: no download
model = loaded.model
before_total = sum(p.numel() for p in model.parameters())
batch = loaded.tokenizer(["A wonderful, moving film.", "Dull and far too long."], padding=True, return_tensors="pt")
with torch.no_grad():
    logits_before = model(**batch).logits

config = lorafit.LoRAConfig(r=4, alpha=8.0, targets=["key", "value", "classifier"])
adapted = lorafit.apply_lora(model, config)
lorafit.mark_only_lora_as_trainable(model)
trainable, total = lorafit.count_parameters(model)
print(f"{adapted} layers adapted; trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
with torch.no_grad():
    torch.testing.assert_close(model(**batch).logits, logits_before, atol=1e-6, rtol=0)  # unchanged at init"""),
    new_markdown_cell("""## 4. A few steps of training, then merge

Only `A` and `B` change. For inference the update folds into the weight,
`W = W0 + (alpha / r) B A`, so the adapted model costs nothing extra; merging and
unmerging are explicit and idempotent."""),
    new_code_cell("""frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
labels = torch.tensor([1, 0])
model.train()
for step in range(STEPS):
    loss = nn.functional.cross_entropy(model(**batch).logits, labels)
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")
model.eval()
assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # frozen stayed frozen

with torch.no_grad():
    unmerged = model(**batch).logits
    lorafit.merge_lora(model)
    merged = model(**batch).logits
torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
key = model.bert.encoder.layer[0].attention.self.key
torch.testing.assert_close(key.base.weight, frozen["bert.encoder.layer.0.attention.self.key.base.weight"]
                           + key.scaling * key.lora_B @ key.lora_A, atol=1e-6, rtol=0)
print("merged logits equal the unmerged ones:", merged)"""),
]
LORA_FROM_SCRATCH.insert(2, new_code_cell("""import os

STEPS = int(os.environ.get("LORAFIT_EXAMPLE_STEPS", "5"))  # the test suite runs fewer"""))

COMPARE = [
    new_markdown_cell("""# Three ways to fine-tune, compared

The experiment lorafit grew from: fine-tune a pretrained encoder on IMDb reviews
(binary sentiment) three ways and see what each costs and buys.

- **last-two-layers**: only the head's two last layers train (BERT/MiniLM: `pooler.dense`, `classifier`);
- **full**: every parameter trains;
- **lora**: rank-4 adapters on attention key and value and on the classifier.

`lorafit.compare` trains each in a process of its own on the same data and seed and
writes a report; the figures below read its results."""),
    new_code_cell("""import os

import matplotlib.pyplot as plt

import lorafit

# The embedded IMDb sample by default; point DATA at the full archive for the real experiment.
DATA = os.environ.get("LORAFIT_EXAMPLE_DATA")  # None: the embedded sample
SIZES = dict(train_size=int(os.environ.get("LORAFIT_EXAMPLE_TRAIN", "600")),
             val_size=int(os.environ.get("LORAFIT_EXAMPLE_VAL", "100")),
             test_size=int(os.environ.get("LORAFIT_EXAMPLE_TEST", "400")),
             max_length=int(os.environ.get("LORAFIT_EXAMPLE_MAX_LENGTH", "256")))
EPOCHS = int(os.environ.get("LORAFIT_EXAMPLE_EPOCHS", "3"))
OUT = os.environ.get("LORAFIT_EXAMPLE_OUT", "runs/example-compare")
STRATEGIES = os.environ.get("LORAFIT_EXAMPLE_STRATEGIES", "full,last-two-layers,lora").split(",")"""),
    new_code_cell("""result = lorafit.compare(strategies=STRATEGIES, data=DATA, epochs=EPOCHS, out=OUT, overwrite=True,
                         progress=False, **SIZES)
for name, run in result.runs.items():
    print(f"{name:16s} test accuracy {run.test_accuracy:.4f}  trainable {run.final['trainable_params']:>11,}  "
          f"train {run.final['train_seconds']:.0f}s  peak memory {run.final['peak_memory_mb']:,.0f} MB")"""),
    new_markdown_cell("## Loss and accuracy per epoch"),
    new_code_cell("""fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
for name, run in result.runs.items():
    epochs = [h["epoch"] for h in run.history]
    ax_loss.plot(epochs, [h["train_loss"] for h in run.history], "-o", label=f"{name} train")
    ax_loss.plot(epochs, [h["val_loss"] for h in run.history], "--o", label=f"{name} validation")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in run.history], "-o", label=name)
ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="accuracy")
ax_loss.legend(fontsize=7)
ax_acc.legend()
plt.show()"""),
    new_markdown_cell("## What each costs: accuracy against trainable parameters"),
    new_code_cell("""fig, ax = plt.subplots(figsize=(6, 4))
for name, run in result.runs.items():
    ax.scatter(run.final["trainable_params"], run.test_accuracy, s=60)
    ax.annotate(name, (run.final["trainable_params"], run.test_accuracy))
ax.set(xscale="log", xlabel="trainable parameters", ylabel="test accuracy")
plt.show()"""),
    new_markdown_cell("## The trained LoRA model, for predictions"),
    new_code_cell("""run = lorafit.load_run(result.runs["lora"].path)
for p in run.predict(["A wonderful, moving film.", "Dull and far too long; I left early."]):
    print(f"{p['label']}  {p['probability']:.3f}  {p['text']}")"""),
]


def write(name: str, cells: list) -> None:
    for i, cell in enumerate(cells):  # stable ids, so rebuilding changes nothing that did not change
        cell["id"] = f"{Path(name).stem.replace('_', '-')}-{i}"
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nbformat.validate(nb)
    nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    write("lora_from_scratch.ipynb", LORA_FROM_SCRATCH)
    write("compare_strategies.ipynb", COMPARE)

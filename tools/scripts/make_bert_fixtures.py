"""Makes the BERT fixtures and records what transformers 4.48 computes on them.

Writes tests/fixtures/bert/:
- `vocab.txt`: a small WordPiece vocabulary (shared by both checkpoints),
- `bert-random/`: a randomly initialised `BertModel` (no heads; tensors without the `bert.` prefix),
  safetensors, with only `vocab.txt` + `tokenizer_config.json` (the tokenizer is built from them),
- `bert-classifier/`: a `BertForSequenceClassification` (3 labels, `id2label`) whose classifier
  was trained here for a few hundred Adam steps on `emotions.jsonl`, saved as `pytorch_model.bin`
  with the LayerNorm parameters named `gamma` / `beta` (as the original `bert-base-uncased` names
  them) and a `tokenizer.json`,
- `emotions.jsonl`: the toy dataset (text, label),
- `expected.safetensors`: for each checkpoint (`random.` / `classifier.`) and each text `i` of
  TEXTS: `ids.i` and `types.i` (the tokenizer's input_ids and token_type_ids, truncated to the
  model's 40 positions), `hidden.i` ([layers + 1, len, hidden]), `attn.i` ([layers, heads, len,
  len]) and, for the classifier, `logits` ([texts, labels]); all from ONE padded batch
  (`attention_mask`), cut back to each text's length,
- `classifier.importance*`: the loss, its gradient with respect to a head mask (of ones, and with
  head 2 of layer 1 masked) and the normalised head importance over `emotions.jsonl`,
- `classifier.entropy`: each head's attention entropy on `emotions.jsonl`, summed over the real
  query positions and divided by the real tokens (bertology's `attn_entropy / tot_tokens`), and
  `classifier.correlation`: Pearson's coefficient of that entropy and the importance,
- `classifier.search.*`: the masking search on `emotions.jsonl` (threshold 5%: stop when the
  accuracy falls below 95% of the start): `curve` ([steps, 2]: heads masked, accuracy rounded to 4
  places), `mask` (the last mask within the threshold), `order` (the heads masked, in order);
  `classifier.pruned.logits`: the logits of that mask's heads pruned with `prune_heads`, saved and
  reloaded by transformers (equal to the masked model's, `classifier.masked.logits`), and
  `classifier.pruned.parameters` (before, after),
- `expected.json`: TEXTS, and the classifier's predicted labels and accuracy on `emotions.jsonl`.

    python tools/scripts/make_bert_fixtures.py   # needs torch, transformers==4.48.2, safetensors
"""
import json
import os
import random
import tempfile

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "fixtures", "bert")
MAX_POSITIONS = 40

WORDS = """i you we they he she it am is are was feel felt so very really not today day night
what a an the this that my your sad sadness happy joy angry anger glad love hate cry smile
afraid lonely bright great terrible awful lovely good bad friend friends home work rain sun
cafe naive and but with of to in at , . ! ? ' - """.split()
PIECES = "un re ##s ##ed ##ing ##ly ##ness ##er ##est ##happi ##n ##y ##e ##a ##i ##o ##t".split()
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
VOCAB = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + LETTERS
                           + ["##" + c for c in LETTERS] + PIECES))

LABELS = ["sadness", "joy", "anger"]
CUES = {
    "sadness": ["sad", "cry", "lonely", "terrible", "rain", "awful"],
    "joy": ["happy", "glad", "love", "smile", "lovely", "great", "sun"],
    "anger": ["angry", "hate", "anger", "bad", "awful"],
}
FILLER = "i you we feel felt so very really today day night the this my your friend friends home work".split()

# Edge cases for the tokenizer and the forward: upper case and accents (lower-cased, stripped),
# sub-words, an unknown word and character, punctuation, a pair (token types), a text longer than
# the 40 positions (truncated), a one-word text.
TEXTS = [
    ("I feel so HAPPY today!", None),
    ("Café naïve unhappiness, what a sad day.", None),
    ("i hate this terrible rain", "but my friends smile"),
    ("zyx 你 ?", None),
    (" ".join(["really"] * 45) + " angry", "and so very very sad"),
    ("glad", None),
]


def write_vocab(path):
    with open(path, "w") as f:
        f.write("\n".join(VOCAB) + "\n")


def tokenizer(dir_):
    return BertTokenizerFast(vocab_file=os.path.join(dir_, "vocab.txt"), do_lower_case=True,
                             model_max_length=MAX_POSITIONS)


def config(**extra):
    return BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=MAX_POSITIONS, type_vocab_size=2,
                      hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation="eager", **extra)


def dataset(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(len(LABELS))
        words = rng.sample(FILLER, rng.randint(2, 6)) + [rng.choice(CUES[LABELS[label]])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": LABELS[label]})
    return rows


def record(model, tok, prefix, out):
    # The tokenizer takes either all pairs or all singles in one call: encode each text alone, then
    # pad them into one batch by hand.
    rows = []
    for a, b in TEXTS:
        e = tok(a, b, truncation="longest_first", max_length=MAX_POSITIONS)
        rows.append((e["input_ids"], e["token_type_ids"]))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    types = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row_ids, row_types) in enumerate(rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        types[i, :len(row_types)] = torch.tensor(row_types)
        mask[i, :len(row_ids)] = 1
    with torch.no_grad():
        result = model(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True,
                       output_attentions=True)
    for i, (row_ids, row_types) in enumerate(rows):
        n = len(row_ids)
        out[f"{prefix}ids.{i}"] = torch.tensor(row_ids, dtype=torch.int64)
        out[f"{prefix}types.{i}"] = torch.tensor(row_types, dtype=torch.int64)
        out[f"{prefix}hidden.{i}"] = torch.stack([h[i, :n] for h in result.hidden_states]).contiguous()
        out[f"{prefix}attn.{i}"] = torch.stack([a[i, :, :n, :n] for a in result.attentions]).contiguous()
    if hasattr(result, "logits"):
        out[f"{prefix}logits"] = result.logits.contiguous()


def main():
    os.makedirs(OUT, exist_ok=True)
    write_vocab(os.path.join(OUT, "vocab.txt"))
    out = {}

    # The random encoder: BertModel's own initialisation, saved without heads.
    torch.manual_seed(0)
    random_dir = os.path.join(OUT, "bert-random")
    os.makedirs(random_dir, exist_ok=True)
    encoder = BertModel(config(), add_pooling_layer=True).eval()
    encoder.save_pretrained(random_dir, safe_serialization=True)
    write_vocab(os.path.join(random_dir, "vocab.txt"))
    with open(os.path.join(random_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "model_max_length": MAX_POSITIONS, "tokenizer_class": "BertTokenizer"}, f)
    record(encoder, tokenizer(random_dir), "random.", out)

    # The classifier: a random encoder whose classifier (and the rest, gently) learns the toy task.
    torch.manual_seed(1)
    cfg = config(num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                 label2id={l: i for i, l in enumerate(LABELS)})
    classifier = BertForSequenceClassification(cfg)
    tok = tokenizer(OUT)
    train = dataset(240, seed=2)
    held_out = dataset(30, seed=3)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    classifier.train()
    for step in range(300):
        batch = train[(step * 16) % len(train):][:16]
        enc = tok([r["text"] for r in batch], padding=True, return_tensors="pt")
        labels = torch.tensor([LABELS.index(r["label"]) for r in batch])
        loss = classifier(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    classifier.eval()
    classifier_dir = os.path.join(OUT, "bert-classifier")
    os.makedirs(classifier_dir, exist_ok=True)
    cfg.save_pretrained(classifier_dir)
    # The original BERT checkpoints name LayerNorm parameters gamma / beta; transformers renames them.
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in classifier.state_dict().items()}
    torch.save(state, os.path.join(classifier_dir, "pytorch_model.bin"))
    tok.save_pretrained(classifier_dir)
    os.remove(os.path.join(classifier_dir, "vocab.txt"))  # tokenizer.json alone
    reloaded = BertForSequenceClassification.from_pretrained(classifier_dir, attn_implementation="eager").eval()
    for k, v in classifier.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    record(reloaded, BertTokenizerFast.from_pretrained(classifier_dir), "classifier.", out)

    with open(os.path.join(OUT, "emotions.jsonl"), "w") as f:
        for row in held_out:
            f.write(json.dumps(row) + "\n")
    enc = tok([r["text"] for r in held_out], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = reloaded(**enc).logits
    predicted = [LABELS[i] for i in logits.argmax(-1).tolist()]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, held_out)) / len(held_out)
    out["classifier.emotions.probs"] = logits.softmax(-1).contiguous()
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"texts": TEXTS, "emotions": {"predicted": predicted, "accuracy": accuracy}}, f, indent=1)
    print("held-out accuracy", accuracy)

    # Head importance as Michel et al. (2019) and transformers' bertology example compute it: the
    # gradient of the classification loss (the mean cross-entropy of the padded batch) with respect
    # to a head mask of ones; its absolute value divided by the batch's real tokens, then by each
    # layer's L2 norm (+1e-20). Recorded raw and normalised; a mask with a zero head too.
    enc = tok([r["text"] for r in held_out], padding=True, return_tensors="pt")
    labels = torch.tensor([LABELS.index(r["label"]) for r in held_out])
    for name, zero in [("importance", None), ("importance_masked", (1, 2))]:
        head_mask = torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads)
        if zero is not None:
            head_mask[zero] = 0.0
        head_mask.requires_grad_(True)
        result = reloaded(**enc, labels=labels, head_mask=head_mask)
        result.loss.backward()
        tokens = enc["attention_mask"].float().sum()
        importance = head_mask.grad.abs() / tokens
        importance /= importance.pow(2).sum(-1).pow(0.5).unsqueeze(-1) + 1e-20
        out[f"classifier.{name}.loss"] = result.loss.detach().reshape(1)
        out[f"classifier.{name}.grad"] = head_mask.grad.contiguous()
        out[f"classifier.{name}"] = importance.contiguous()
        if zero is None:
            with torch.no_grad():
                attentions = reloaded(**enc, output_attentions=True).attentions
            entropy = []
            for attn in attentions:
                plogp = attn * torch.log(attn)
                plogp[attn == 0] = 0
                e = -plogp.sum(-1)
                entropy.append((e * enc["attention_mask"].unsqueeze(1).float()).sum(-1).sum(0))
            entropy = torch.stack(entropy) / tokens
            a, b = entropy.flatten().double(), importance.detach().flatten().double()
            a, b = a - a.mean(), b - b.mean()
            out["classifier.entropy"] = entropy.contiguous()
            out["classifier.correlation"] = ((a * b).sum() / (a.pow(2).sum().sqrt() * b.pow(2).sum().sqrt())).reshape(1)

    search(reloaded, enc, labels, out)
    save_file(out, os.path.join(OUT, "expected.safetensors"))


def accuracy_and_importance(model, enc, labels, mask):
    m = mask.clone().requires_grad_(True)
    result = model(**enc, labels=labels, head_mask=m)
    result.loss.backward()
    importance = m.grad.abs() / enc["attention_mask"].float().sum()
    importance /= importance.pow(2).sum(-1).pow(0.5).unsqueeze(-1) + 1e-20
    correct = int((result.logits.argmax(-1) == labels).sum())
    return round(correct / len(labels), 4), importance.detach()


def search(model, enc, labels, out, threshold=0.05):
    """The masking search (as the bertology exercise runs it, one head at a time): mask the least
    important unmasked head (ties: lower layer, then head), recompute importance and accuracy under
    the new mask, stop below (1 - threshold) x the starting accuracy or when no head is left."""
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    mask = torch.ones(layers, heads)
    base, importance = accuracy_and_importance(model, enc, labels, mask)
    curve, order, final = [(0, base)], [], mask.clone()
    while True:
        remaining = [(l, h) for l in range(layers) for h in range(heads) if mask[l, h] != 0]
        if not remaining:
            break
        layer, head = min(remaining, key=lambda lh: (importance[lh].item(), lh))
        mask[layer, head] = 0.0
        accuracy, importance = accuracy_and_importance(model, enc, labels, mask)
        curve.append((int((mask == 0).sum()), accuracy))
        if accuracy < base * (1 - threshold):
            break
        order.append((layer, head))
        final = mask.clone()
    print("masking search", curve)
    out["classifier.search.curve"] = torch.tensor(curve, dtype=torch.float64)
    out["classifier.search.mask"] = final.contiguous()
    out["classifier.search.order"] = torch.tensor(order, dtype=torch.int64).reshape(-1, 2)

    # Physical pruning of the final mask, as BertModel.prune_heads does it; saved, reloaded.
    with torch.no_grad():
        masked = model(**enc, head_mask=final).logits
    pruned = BertForSequenceClassification.from_pretrained(model.name_or_path, attn_implementation="eager").eval()
    before = sum(p.numel() for p in pruned.parameters())
    heads_to_prune = {}
    for layer, head in order:
        heads_to_prune.setdefault(layer, []).append(head)
    pruned.prune_heads(heads_to_prune)
    after = sum(p.numel() for p in pruned.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        pruned.save_pretrained(tmp)
        reloaded = BertForSequenceClassification.from_pretrained(tmp, attn_implementation="eager").eval()
        with torch.no_grad():
            logits = reloaded(**enc).logits
    assert torch.allclose(logits, masked, atol=1e-5), (logits - masked).abs().max()
    out["classifier.masked.logits"] = masked.contiguous()
    out["classifier.pruned.logits"] = logits.contiguous()
    out["classifier.pruned.parameters"] = torch.tensor([before, after], dtype=torch.int64)
    print("parameters", before, "->", after, "pruned", heads_to_prune)


if __name__ == "__main__":
    main()

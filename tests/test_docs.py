"""The README starts a user in one screen and links the reference pages, which exist; no page
speaks of the project's issue numbers; the README's figure and links resolve."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = ("job-spec", "cli", "results", "durability", "searches", "clusters", "security",
         "benchmarks")


def test_the_readme_is_one_screen_with_its_two_commands_and_your_model_early():
    lines = README.splitlines()
    assert len(lines) <= 250
    assert "make demo" in README and "make test" in README
    first = "\n".join(lines[:60])
    assert "## Your model and data" in first and "jobs/your_model.yaml" in first


def test_every_reference_page_is_linked_and_every_link_resolves():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert {f"docs/{p}.md" for p in PAGES} <= set(links)
    for page in (ROOT / "docs").glob("*.md"):
        links += [str(Path("docs", link)) for link in
                  re.findall(r"\]\(([^)#:]+)\)", page.read_text())]
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing
    assert (ROOT / "docs" / "figures" / "heatmap_untrac.png").stat().st_size > 10_000


def test_no_page_mentions_issue_numbers():
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "cluster" / "README.md"]
    said = [f"{p.name}: {m.group(0)}" for p in pages
            for m in re.finditer(r"(?i)\bissues? \d+", p.read_text())]
    assert not said, said


# --- the job spec page states the schema's keys and defaults ------------------------------------

def _yaml_block(page: str, first_key: str) -> list[str]:
    """The lines of the page's ```yaml block whose first line starts with `first_key`."""
    for block in re.findall(r"```yaml\n(.*?)```", page, re.S):
        if block.startswith(first_key):
            return block.splitlines()
    raise AssertionError(f"no ```yaml block starting with {first_key!r}")


LINE = re.compile(r"^(?P<indent> *)(?P<item>- )?(?P<key>[A-Za-z_][\w.]*):(?P<rest>.*)$")
ELLIPSIS = ("[...]", "{...}")  # "the same keys as above"


def _listing(lines: list[str]) -> list[tuple[str, str | None, str]]:
    """(dotted key, value or None for a section, comment) of every key of a YAML listing; a
    list's items are transparent (data.train.name), a flow mapping's keys are keys too."""
    out: list[tuple[str, str | None, str]] = []
    stack: list[tuple[int, str]] = []
    for line in lines:
        m = LINE.match(line)
        if not m:
            assert line.strip() == "" or line.strip().startswith("#"), line
            continue
        indent = len(m["indent"]) + (2 if m["item"] else 0)
        value, _, comment = m["rest"].partition(" #")
        value = value.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m["key"]])
        if value.startswith("{") and value not in ELLIPSIS:
            out.append((path, None, comment))
            out += [(f"{path}.{k}", yaml.safe_dump(v).removesuffix("\n...\n").strip(), "")
                    for k, v in yaml.safe_load(value).items()]
        else:
            out.append((path, value or None, comment.strip()))
        stack.append((indent, m["key"]))
    return out


def _field(path: str, root=None):
    """(model class, field name, FieldInfo) of a dotted key of the job spec; a dict's own keys
    (model.config's, search.space's) give the dict's field; None where the path is no key."""
    from untrac_ray.inputs.loading import inner_model
    from untrac_ray.inputs.spec import JobSpec

    model, found = root or JobSpec, None
    for part in path.split("."):
        if found is not None and _is_dict(found[2].annotation):
            return found
        if model is None or part not in model.model_fields:
            return None
        found = (model, part, model.model_fields[part])
        model = inner_model(found[2].annotation)
    return found


def _is_dict(annotation) -> bool:
    return typing.get_origin(annotation) is dict or any(
        typing.get_origin(a) is dict for a in typing.get_args(annotation))


def _models(root) -> set:
    """Every spec model reachable from `root` (a dict of models, such as search.space, is a
    leaf)."""
    from untrac_ray.inputs.loading import inner_model

    seen, todo = set(), [root]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for f in model.model_fields.values():
            inner = None if _is_dict(f.annotation) else inner_model(f.annotation)
            if inner is not None:
                todo.append(inner)
    return seen


JOB_SPEC = (ROOT / "docs" / "job-spec.md").read_text()
SEARCHES = (ROOT / "docs" / "searches.md").read_text()


def test_every_key_the_job_spec_lists_exists_and_every_default_it_states_is_the_schemas():
    """A value in the listing is the default (`untrac: {}` runs with exactly it); a key
    without one is marked `# required`, and its value is an example."""
    listing = _listing(_yaml_block(JOB_SPEC, "name:"))
    wrong = []
    for path, value, comment in listing:
        found = _field(path)
        if found is None:
            wrong.append(f"{path}: not a key of the spec")
            continue
        _, name, info = found
        if value is None or value in ELLIPSIS or name != path.rsplit(".", 1)[-1]:
            continue
        if info.is_required():
            if "required" not in comment:
                wrong.append(f"{path}: required, not marked '# required'")
            continue
        stated, default = yaml.safe_load(value), info.get_default(call_default_factory=True)
        if hasattr(default, "value"):  # an enum
            default = default.value
        if stated != default:
            wrong.append(f"{path}: the page says {stated!r}, the schema's default is "
                         f"{default!r}")
    assert not wrong, wrong


def test_every_key_of_the_schema_is_named_in_the_job_spec_and_searches_in_its_page():
    """Each section's every key is listed at least once (a model used twice, as training and
    pretraining.training, is listed once); search's keys are on docs/searches.md."""
    from untrac_ray.inputs.spec import JobSpec
    from untrac_ray.inputs.spec_search import SEARCH_DOMAINS, SearchSpec

    def named(lines: list[str], root) -> set[tuple[type, str]]:
        out = set()
        for path, _, _ in _listing(lines):
            found = _field(path, root)
            if found is not None:
                out.add(found[:2])
        return out

    searches = _models(SearchSpec)
    want = {(m, f) for m in _models(JobSpec) - searches for f in m.model_fields}
    missing = want - named(_yaml_block(JOB_SPEC, "name:"), JobSpec)
    assert not missing, sorted(f"{m.__name__}.{f}" for m, f in missing)
    want = {(m, f) for m in searches for f in m.model_fields}
    missing = want - named(_yaml_block(SEARCHES, "methods:"), JobSpec)
    assert not missing, sorted(f"{m.__name__}.{f}" for m, f in missing)
    assert all(re.search(rf"\b{kind}\b", SEARCHES) for kind in SEARCH_DOMAINS)


# --- the CLI page names every option of every command -----------------------------------------

def _synopses(page: str) -> dict[str, str]:
    """Command -> its synopsis in the page's code blocks: the line `untrac-ray CMD ...` and the
    indented lines that continue it."""
    out: dict[str, str] = {}
    for block in re.findall(r"```\n(.*?)```", page, re.S):
        current = None
        for line in block.splitlines():
            m = re.match(r"untrac-ray (\w+)", line)
            if m:
                current = m[1]
                out[current] = out.get(current, "") + " " + line
            elif current and line.startswith(" "):
                out[current] += " " + line
            else:
                current = None
    return out


def test_every_option_of_every_command_is_in_its_synopsis_on_the_cli_page():
    import typer

    from untrac_ray.cli.main import app

    page = (ROOT / "docs" / "cli.md").read_text()
    synopses = _synopses(page)
    group = typer.main.get_command(app)
    missing = []
    for name, command in group.commands.items():
        if name not in synopses:
            missing.append(f"{name}: no synopsis")
            continue
        for param in command.params:
            if param.param_type_name != "option":
                continue
            for opt in param.opts + param.secondary_opts:
                if opt.startswith("--") and not re.search(
                        rf"(?<![\w-]){re.escape(opt)}(?![\w-])", synopses[name]):
                    missing.append(f"{name} {opt}")
    assert not missing, missing
    assert "untrac-ray --version" in page


# --- numbers the pages state, against what computes them --------------------------------------

def test_the_pages_state_fishers_interval_of_the_pearson_they_quote():
    from untrac_ray.results.scoring import pearson_interval

    text = " ".join(README.split())
    low4, low8 = pearson_interval(0.9, 4)[0], pearson_interval(0.9, 8)[0]
    assert f"reaches down to {low4:+.2f} (4 sets) or {low8:+.2f} (8)" in text, (low4, low8)
    stated = []
    for page in (ROOT / "docs").glob("*.md"):
        stated += re.findall(r"with (\d) points,? (?:a Pearson of )?\+0\.9 has a 95% interval "
                             r"from (?:about )?([+-]\d\.\d+) to ([+-]\d\.\d+)",
                             " ".join(page.read_text().split()))
    assert stated
    for n, low, high in stated:
        want = pearson_interval(0.9, int(n))
        digits = len(high.split(".")[1])
        assert (low, high) == (f"{want[0]:+.2f}", f"{want[1]:+.{digits}f}"), (n, low, high)


def test_the_gang_tolerance_the_docs_state_is_the_one_the_test_asserts():
    tol = re.search(r"^TOL = (\S+)", (ROOT / "tests" / "test_gang.py").read_text(), re.M)[1]
    pages = [README, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    stated = [m[1] for p in pages for m in re.finditer(
        r"single-actor cells (?:with)?in (\S+?)[ ,.)]", " ".join(p.split()))]
    assert stated and all(float(s) == float(tol) for s in stated), (stated, tol)


def test_the_readmes_reading_of_its_heatmap_is_true_of_the_saved_cells():
    """The heatmap's cells are saved beside the figure; the README counts the subsets where
    both of their teachers rank first and second."""
    import pandas as pd

    cells = pd.read_csv(ROOT / "benchmarks" / "results" / "heatmap_untrac_text_corpora.csv")
    matrix = cells.pivot(index="train_set", columns="test_set", values="influence")
    teachers = {"Match": {"Weather", "Sports"}, "Legal": {"Legal", "Dialogue"},
                "Verse": {"Poems", "Recipes"}}
    both = [t for t in matrix.columns if set(matrix[t].nlargest(2).index) ==
            next(v for k, v in teachers.items() if t.startswith(k))]
    text = " ".join(README.split())
    assert f"raises the loss most on {len(both)} of the {matrix.shape[1]} subsets" in text
    assert (matrix.to_numpy() > 0).all() and "Every cell is positive" in text


# --- the commands the pages give run as written -------------------------------------------------

def _blocks(page: str) -> list[list[list[str]]]:
    """The commands of each of the page's ```bash blocks, continuation lines joined, shell
    variables the block assigns (V="...") expanded, split into words; comments dropped."""
    import shlex

    out = []
    for block in re.findall(r"```bash\n(.*?)```", page, re.S):
        vars_: dict[str, str] = {}
        commands = []
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            assign = re.fullmatch(r'(\w+)="([^"]*)"', line)
            if assign:
                vars_[assign[1]] = assign[2]
                continue
            for name, value in vars_.items():
                line = line.replace(f"${name}", value)
            commands.append(shlex.split(line))
        out.append(commands)
    return out


def _commands(page: str) -> list[list[str]]:
    return [c for block in _blocks(page) for c in block]


def _options_of(script: Path) -> set[str]:
    return set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', script.read_text()))


def test_every_benchmark_command_on_the_pages_uses_options_and_files_that_exist():
    """A command names only options its script has, files that exist (a glob matches), the
    variants its variants file holds; rows of the Pearson protocol and of the LDS one are not
    read together."""
    from glob import glob

    pages = {"README.md": README, **{f"docs/{p.name}": p.read_text()
                                     for p in (ROOT / "docs").glob("*.md")}}
    wrong, seen = [], 0
    for name, page in pages.items():
        for words in _commands(page):
            scripts = [w for w in words if re.fullmatch(r"benchmarks/\w+\.py", w)]
            if not scripts:
                continue
            seen += 1
            script, args = ROOT / scripts[0], words[words.index(scripts[0]) + 1:]
            known = _options_of(script)
            wrong += [f"{name}: {scripts[0]} {a}: no such option" for a in args
                      if a.startswith("--") and a.split("=")[0] not in known]
            files = [a for a in args if re.match(r"(jobs|benchmarks|data)/", a)]
            for f in files:
                if not glob(str(ROOT / f)):
                    wrong.append(f"{name}: {scripts[0]} {f}: no such file")
            if script.name != "variants.py":
                continue
            variants_file = (args[args.index("--variants") + 1] if "--variants" in args
                             else "benchmarks/variants.yaml")
            variants = set(yaml.safe_load((ROOT / variants_file).read_text())) | {"paper"}
            if "--chosen" in args:
                i = args.index("--chosen") + 1
                while i < len(args) and "=" in args[i]:
                    if args[i].split("=", 1)[1] not in variants:
                        wrong.append(f"{name}: {args[i]} is not in {variants_file}")
                    i += 1
            if "--from-rows" in args:
                rows = [p for a in files for p in glob(str(ROOT / a)) if p.endswith(".csv")]
                kinds = {"lds" in Path(p).read_text().splitlines()[0].split(",") for p in rows}
                if len(kinds) > 1:
                    wrong.append(f"{name}: --from-rows reads Pearson and LDS rows together")
    assert seen >= 10 and not wrong, wrong


def test_the_runs_beside_saved_rows_reproduce_their_protocol():
    """Where a block prints tables from saved rows (--from-rows), the runs it gives are of
    the same protocol: rows without an LDS column come from runs with --lds-subsets 0 (the
    default retrains 32 subsets and chooses by LDS), and every variant in the rows is in the
    variants file those runs read."""
    from glob import glob

    import pandas as pd

    wrong, checked = [], 0
    for block in _blocks((ROOT / "docs" / "benchmarks.md").read_text()):
        shown = [c for c in block if "benchmarks/variants.py" in c and "--from-rows" in c]
        runs = [c for c in block if "benchmarks/variants.py" in c and "--from-rows" not in c]
        for command in shown:
            files = [f for a in command if a.endswith(".csv") for f in glob(str(ROOT / a))]
            rows = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
            for run in runs:
                checked += 1
                lds_off = "--lds-subsets" in run and run[run.index("--lds-subsets") + 1] == "0"
                if "lds" not in rows.columns and not lds_off:
                    wrong.append(f"{' '.join(run[:6])}...: no --lds-subsets 0")
                variants_file = (run[run.index("--variants") + 1] if "--variants" in run
                                 else "benchmarks/variants.yaml")
                held = set(yaml.safe_load((ROOT / variants_file).read_text())) | {"paper"}
                if set(rows["variant"]) - held:
                    wrong.append(f"{variants_file} lacks {sorted(set(rows['variant']) - held)}")
    assert checked and not wrong, sorted(set(wrong))


def test_every_untrac_ray_command_on_the_pages_uses_options_of_its_command():
    import typer

    from untrac_ray.cli.main import app

    group = typer.main.get_command(app)
    pages = {"README.md": README, **{f"docs/{p.name}": p.read_text()
                                     for p in (ROOT / "docs").glob("*.md")}}
    wrong = []
    for name, page in pages.items():
        for words in _commands(page):
            at = [i for i, w in enumerate(words) if w.endswith("untrac-ray")]
            if not at or at[0] + 1 >= len(words) or words[at[0] + 1].startswith("-"):
                continue
            command = group.commands.get(words[at[0] + 1])
            if command is None:
                wrong.append(f"{name}: untrac-ray {words[at[0] + 1]}: no such command")
                continue
            known = {o for p in command.params for o in p.opts + p.secondary_opts}
            wrong += [f"{name}: untrac-ray {words[at[0] + 1]} {w}" for w in words[at[0] + 2:]
                      if w.startswith("-") and w.split("=")[0] not in known]
    assert not wrong, wrong

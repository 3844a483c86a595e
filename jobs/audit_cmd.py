"""``mfsim audit``: the cosine audit of any (user, item) embedding pair stored as Parquet.

Reads two files (or directories of Parquet parts) with an id column (the first column that is not
``embedding``) and an ``embedding`` column (``fixed_size_list<float32>[k]`` or ``list<float>``), as
the pipeline writes them at ``user_embeddings/objective=.../scaling=...`` and ``item_embeddings/...``
(``pipeline.inputs.read_embeddings``), and runs ``pipeline.lists.audit.audit_embedding_pair``. Only the
sampled users are kept in memory (the users file is streamed in record batches); the items are
read whole, since item-item lists need all of them.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mfsim.pipeline.lists.audit import AuditResult, audit_embedding_pair, sample_rows
from mfsim.pipeline.errors import MfsimError
from mfsim.pipeline.inputs import open_embeddings, read_embeddings

def format_result(result: AuditResult, item_ids: pa.Array | None = None, show_items: int = 5) -> str:
    """The stability table, the score check, the least stable items (by id) and the verdict."""
    lines = [f"{'kind':<10} {'metric':<7} {'scaling_b':<16} {'rows':>7} {'mean':>6} {'p10':>6} {'p50':>6} "
             f"{'p90':>6} {'min':>6}"]
    for r in result.stability.to_pylist():
        lines.append(f"{r['kind']:<10} {r['metric']:<7} {r['scaling_b']:<16} {r['n_items']:>7} "
                     f"{r['jaccard_mean']:>6.3f} {r['jaccard_p10']:>6.3f} {r['jaccard_p50']:>6.3f} "
                     f"{r['jaccard_p90']:>6.3f} {r['jaccard_min']:>6.3f}")
    s = result.summary
    lines.append(f"score change under D: max abs {s['score_change_max_abs']:.3g}, max relative "
                 f"{s['score_change_max_rel']:.3g} ({s['n_users_sampled']} of {s['n_users']} users sampled)")
    least = [r for r in result.least_stable.to_pylist() if r["kind"] == "item_item"][:show_items]
    if least and item_ids is not None:
        lines.append("least stable items (cosine): " + ", ".join(
            f"{item_ids[r['index']].as_py()} ({r['jaccard']:.2f})" for r in least))  # index: row of item_ids
    lines.append(s["verdict"])
    return "\n".join(lines)


def embedding_sets(path: Path) -> list[str]:
    """The partition folders (``objective=<o>/scaling=<s>``, relative to ``path``) that hold Parquet files under a
    directory; ``[""]`` for files directly in it (or a file)."""
    if not path.is_dir():
        return [""]
    folders = sorted({str(f.parent.relative_to(path)) for f in path.rglob("*.parquet")
                      if not any(part.startswith((".", "_")) for part in f.relative_to(path).parts)})
    return ["" if f == "." else f for f in folders]


def run_of(path: Path) -> Path | None:
    """The published run a path lies in (the nearest folder above it with ``_manifest.json``), or None."""
    for folder in [path, *path.parents]:
        if (folder / "_manifest.json").is_file():
            return folder
    return None


def partition_of(path: Path) -> dict[str, str]:
    """The hive keys in a path (``objective=eq1/scaling=symmetric`` -> their values)."""
    return dict(part.split("=", 1) for part in path.parts if "=" in part)


def check_pair(users: Path, items: Path) -> str | None:
    """Refuse what the audit cannot judge, with what to pass instead (``MfsimError``): a folder holding several
    embedding sets (a run's ``user_embeddings/``: one per objective and scaling), users and items of different runs
    or of different solutions. For the cosine-trained model, the line that says why its cosine lists are not
    audited (returned: the command prints it and exits 0); None when the pair is auditable."""
    for side, path in (("--users", users), ("--items", items)):
        sets = embedding_sets(path)
        if len(sets) > 1:
            shown = ", ".join(sets[:6]) + (f" and {len(sets) - 6} more" if len(sets) > 6 else "")
            raise MfsimError(f"{side} {path} holds {len(sets)} embedding sets ({shown}); the audit reads one: pass "
                             f"one of them, e.g. {side} {path / sets[0]}")
    users_run, items_run = run_of(users), run_of(items)
    if users_run is not None and items_run is not None and users_run.resolve() != items_run.resolve():
        raise MfsimError(f"--users is from run {users_run} and --items from run {items_run}: the audit compares "
                         "one model's users and items; pass both from the same run")
    u_keys = {**partition_of(users), **partition_of(Path(embedding_sets(users)[0]))}
    i_keys = {**partition_of(items), **partition_of(Path(embedding_sets(items)[0]))}
    for key in ("objective", "scaling"):
        if key in u_keys and key in i_keys and u_keys[key] != i_keys[key]:
            raise MfsimError(f"--users is {key}={u_keys[key]} and --items {key}={i_keys[key]}: pass the users and the "
                             "items of one solution (the same objective=.../scaling=... folders)")
    if u_keys.get("objective") == "cosine" or i_keys.get("objective") == "cosine":
        return ("objective=cosine: the cosine-trained model scores a user and an item by the cosine of their "
                "embeddings, so its cosine lists are its own scores, and (U D, I D^-1) is not an equally good "
                "solution of it: there is no arbitrary scaling to audit. Its cosine lists are the ones to use.")
    return None


def run_audit_command(users_path: str | Path, items_path: str | Path, *, top_n: int = 100, draws: int = 5,
                      spread: float = 1.0, seed: int = 0, out: str | Path | None = None,
                      max_users: int = 10_000, cosine_norm_floor: float = 0.0) -> int:
    """Audit a stored (user, item) embedding pair; print the table and the verdict; return 0.

    Parameters
    ----------
    users_path, items_path : path
        Parquet files with an id column and an ``embedding`` column of the same k.
    top_n, draws, spread, seed, max_users, cosine_norm_floor
        As for ``pipeline.lists.audit.audit_embedding_pair``.
    out : path, optional
        Where to write the stability table as Parquet (parent folders are created).

    Raises
    ------
    MfsimError
        Missing files or columns, malformed or non-finite embeddings, different k, bad parameters
        or an unwritable ``out``; the message names the file and column.
    """
    verdict = check_pair(Path(users_path), Path(items_path))
    if verdict is not None:
        print(verdict)
        return 0
    users_pf, _ = open_embeddings(users_path, "users")
    rows = sample_rows(users_pf.metadata.num_rows, max_users, seed)
    _, U = read_embeddings(users_path, "users", rows)
    item_ids, I = read_embeddings(items_path, "items")
    if U.shape[1] != I.shape[1]:
        raise MfsimError(f"the embeddings of {users_path} have k = {U.shape[1]} and those of {items_path} "
                         f"k = {I.shape[1]}; audit users and items of the same model.")
    result = audit_embedding_pair(U, I, top_n=top_n, draws=draws, spread=spread, seed=seed,
                                  max_users=max_users, user_index=rows, cosine_norm_floor=cosine_norm_floor)
    result.summary["n_users"] = users_pf.metadata.num_rows  # the file's users, of which rows were sampled
    print(format_result(result, item_ids))
    if out is not None:
        out = Path(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(result.stability, out)
        except OSError as exc:
            raise MfsimError(f"cannot write the stability table to {out}: {exc}; pass a writable --out path.") from None
    return 0

"""Fuzzing the saved-index format: every array and every header field.

For each kind of index (PQTransformer, PQNeighbors with uint16 codes and
refine, IVF-PQ with L2, dot, refine, float64 and removed ids, HNSW-PQ with
refine, tombstones, after compact, and with sealed segments; an int8 and a
float16 re-ranking tier; saved in several row blocks and tombstone pages,
format 6) the saved
files are tampered with,
one change per case:

* every array: values (NaN, inf, huge, out-of-range ints, -1, permuted
  rows...), shape, dtype, Fortran order, byte order, random bytes,
  truncation, a damaged or lying ``.npy`` header;
* every JSON field of the header (parameters, attributes, array entries)
  and of the manifest: other values and types, removed and added keys,
  deep nesting.

Each change is made twice where it makes sense: as a damaged disk would
(checksums left alone), and as someone editing the files on purpose would
(array and header checksums recomputed), which reaches the structural
checks.  The index is then loaded and used (kneighbors at the saved and at
exhaustive settings, partial_fit, remove, compact).  Allowed outcomes:

* ``IndexFormatError`` at load;
* answers equal to the original's (with the loaded parameters, when only
  parameters changed);
* only with checksums recomputed, a different but valid index: every
  answer checked against a naive evaluation of the loaded state (ids live
  and distinct, distances those of the returned ids, and for the
  exhaustive searches the k smallest).

Anything else, and above all a crash of the interpreter, fails.  The cases
run in one child interpreter (a crash there fails the test, and the
progress file names the case); about a minute on two cores.
"""

import copy
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))


def test_file_format_fuzz(tmp_path):
    import pqsk

    root = os.path.dirname(os.path.dirname(os.path.abspath(pqsk.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=900)
    progress = tmp_path / "progress.txt"
    last = progress.read_text().strip().splitlines()[-1:] if progress.exists() else []
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, (
        f"the fuzz interpreter exited with {proc.returncode} during case {last}:\n{tail}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failures"] == [], (
        f"{len(summary['failures'])} failures, e.g.:\n" + "\n".join(summary["failures"][:10]))
    counts = summary["outcomes"]
    # The three outcomes were all reached: the oracle paths are exercised.
    assert counts["rejected"] > 1000 and counts["same"] > 50 and counts["valid"] > 50, counts
    assert summary["cases"] > 3000, summary["cases"]


# -- the child ----------------------------------------------------------------------

N_QUERIES, K = 6, 5


def _kinds():
    import numpy as np

    from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, PQTransformer

    rng = np.random.RandomState(0)
    X = rng.randn(400, 8).astype(np.float32)
    common = dict(n_subspaces=4, n_codewords=16, random_state=0)

    def removed(est):
        est.remove(np.arange(0, 400, 9))

    def compacted(est):
        removed(est)
        est.compact()

    # Two graphs (a sealed segment of 1024 nodes and the growing one), with
    # tombstones in both: every segment file is fuzzed too.
    X2 = rng.randn(1100, 8).astype(np.float32)

    def removed2(est):
        est.remove(np.arange(0, 1100, 9))

    return {
        "pqt": (lambda: PQTransformer(**common), X, None),
        "pq": (lambda: PQNeighbors(K, **common), X, None),
        "pq16-cosine-refine": (lambda: PQNeighbors(K, n_subspaces=2, n_codewords=300,
                                                   metric="cosine", refine_factor=2,
                                                   random_state=0), X, None),
        "ivf": (lambda: IVFPQNeighbors(K, n_lists=4, n_probe=2, metric="sqeuclidean",
                                       **common), X, None),
        "ivf-dot": (lambda: IVFPQNeighbors(K, n_lists=4, n_probe=2, metric="dot", **common),
                    X, None),
        "ivf-refine-removed": (lambda: IVFPQNeighbors(K, n_lists=4, n_probe=2,
                                                      refine_factor=2, **common), X, removed),
        "ivf-float64": (lambda: IVFPQNeighbors(K, n_lists=4, n_probe=2, **common),
                        X.astype(np.float64), None),
        "hnsw": (lambda: HNSWPQNeighbors(K, n_links=4, ef_construction=16, ef_search=8,
                                         **common), X, None),
        "hnsw-refine": (lambda: HNSWPQNeighbors(K, n_links=4, ef_construction=16,
                                                ef_search=8, refine_factor=2,
                                                n_subspaces=4, n_codewords=16,
                                                random_state=np.random.RandomState(1)),
                        X, None),
        "hnsw-removed": (lambda: HNSWPQNeighbors(K, n_links=4, ef_construction=16,
                                                 ef_search=8, **common), X, removed),
        "hnsw-compacted": (lambda: HNSWPQNeighbors(K, n_links=4, ef_construction=16,
                                                   ef_search=8, **common), X, compacted),
        "hnsw-segments": (lambda: HNSWPQNeighbors(K, n_links=4, ef_construction=16,
                                                  ef_search=8, segment_size=1024, **common),
                          X2, removed2),
        # Compact re-ranking tiers: int8 codes with offset and scale, float16 rows.
        "pq-int8-cosine": (lambda: PQNeighbors(K, metric="cosine", refine_factor=2,
                                               refine_dtype="int8", **common), X, None),
        "ivf-float16-removed": (lambda: IVFPQNeighbors(K, n_lists=4, n_probe=2,
                                                       refine_factor=2, refine_dtype="float16",
                                                       **common), X, removed),
        # Format 6 pieces: two row blocks (saved, then appended to) and
        # tombstone pages of PAGED_IDS ids.
        "ivf-refine-paged": (lambda: IVFPQNeighbors(K, n_lists=4, n_probe=2,
                                                    refine_factor=2, **common),
                             X[:300], lambda est: saved_then_grown(est, X[300:])),
        "hnsw-int8-paged": (lambda: HNSWPQNeighbors(K, n_links=4, ef_construction=16,
                                                    ef_search=8, refine_factor=2,
                                                    refine_dtype="int8", **common),
                            X[:300], lambda est: saved_then_grown(est, X[300:])),
    }


# Ids per tombstone page in the "-paged" kinds (pqsk._pages.TOMBSTONE_PAGE).
PAGED_IDS = 128


def saved_then_grown(est, rows):
    """Save ``est`` (its rows become one saved block), append ``rows``
    (a second block at the next save) and remove ids in every page."""
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        est.save(os.path.join(d, "first"))
    est.partial_fit(rows)
    est.remove(np.arange(0, est.n_samples_fit_, 9))


# Tampering: each case is (name, function(path), recompute) ---------------------------

def _leaves(obj, prefix=()):
    """(path, value) of every JSON node below obj, containers included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, prefix + (i,))


def _replacements(value, array_names):
    if isinstance(value, bool):
        return [not value, 0, 1, None, "true"]
    if isinstance(value, int):
        return [value + 1, value - 1, 0, -1, 2**31, 2**63, -2**63, 10**40, 1.5, str(value),
                None, True, [], {}]
    if isinstance(value, float):
        return [value * 2, -value, 0.0, 1e308, float("nan"), "x", None, -1]
    if isinstance(value, str):
        return ["", "x", "euclidean", "dot", "<f8", "<f4", "|u1", "<i8", ">f4",
                "HNSWPQNeighbors", "IVFPQNeighbors", "PQNeighbors", "v000001", "0" * 64,
                value + "x", 1, None]
    if value is None:
        return [0, 1, "x", True, {}, [], {"array": array_names[0]}]
    if isinstance(value, list):
        return [[], None, value + [1], value[:-1], "x", [value]]
    if isinstance(value, dict):
        out = [{}, [], None, {**value, "zz_": 1}]
        out += [{k: v for k, v in value.items() if k != drop} for drop in value]
        return out
    return []


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def _header_cases(base, rnd):
    from index_files import edit_header, read_header

    header = read_header(base)
    names = sorted(header["arrays"])
    cases = []
    for path, value in _leaves(header):
        if not path:
            continue
        options = _replacements(value, names)
        for i, new in enumerate(rnd.sample(options, min(len(options), 5))):
            def edit(p, path=path, new=new, recompute=True):
                edit_header(p, lambda h: _set(h, path, copy.deepcopy(new)), recompute)
            cases.append((f"header{list(path)}={new!r:.40}", edit, True))
            if i == 0:  # as damage: the manifest's checksum is left alone
                cases.append((f"header{list(path)}={new!r:.40} (no checksum)",
                              lambda p, e=edit: e(p, recompute=False), False))
    from index_files import write_header_bytes

    for raw in (b"", b"{", b"[" * 50000 + b"]" * 50000, b"\xff\xfe", b"null", b"[]",
                json.dumps(header).encode()[:-10]):
        cases.append((f"header bytes {raw[:12]!r}",
                      lambda p, raw=raw: write_header_bytes(p, raw), True))
    return cases


def _manifest_cases(base):
    from index_files import replace_file

    def edit(fn):
        def run(p):
            f = os.path.join(p, "MANIFEST.json")
            with open(f) as fh:
                m = json.load(fh)
            out = fn(m)
            replace_file(f, (out if isinstance(out, str)
                             else json.dumps(m if out is None else out)).encode())
        return run

    cases = []
    if not os.path.exists(os.path.join(base, "MANIFEST.json")):
        return cases  # format version 1
    with open(os.path.join(base, "MANIFEST.json")) as f:
        manifest = json.load(f)
    for key, value in manifest.items():
        for new in _replacements(value, ["x"]) + ["../" + str(value), "v1", "v0000010"]:
            cases.append((f"manifest[{key}]={new!r:.30}",
                          edit(lambda m, key=key, new=new: m.__setitem__(key, new)), False))
        cases.append((f"manifest without {key}", edit(lambda m, key=key: m.pop(key)), False))
    for raw in ("", "{", "[" * 50000 + "]" * 50000, "null", json.dumps(manifest)[:-5]):
        cases.append((f"manifest bytes {raw[:12]!r}", edit(lambda m, raw=raw: raw), False))
    cases.append(("manifest removed", lambda p: os.remove(os.path.join(p, "MANIFEST.json")),
                  False))
    return cases


def _value_edits(a, rnd):
    """(name, new array) value changes of a, shape and dtype kept."""
    import numpy as np

    out = []
    if a.size == 0:
        return out
    mid = a.size // 2

    def put(v):
        b = a.copy()
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b.reshape(-1)[mid] = v
        return b

    if a.dtype == bool:
        out += [("flip one", put(not a.reshape(-1)[mid])), ("all true", np.ones_like(a)),
                ("all false", np.zeros_like(a))]
    elif a.dtype.kind in "iu":
        info = np.iinfo(a.dtype)
        for v in sorted({-2, -1, 0, 1, int(a.max()) + 1, a.size, info.max, info.min}):
            if info.min <= v <= info.max:
                out.append((f"[{mid}]={v}", put(v)))
        out += [("all 0", np.zeros_like(a)), ("all max", np.full_like(a, a.max()))]
        if info.min < 0:
            out.append(("all -1", np.full_like(a, -1)))
        lo, hi = int(a.min()), int(a.max())
        out.append(("random in range", np.asarray(
            np.random.RandomState(rnd.randrange(2**31)).randint(lo, hi + 1, a.shape),
            dtype=a.dtype)))
    else:
        for v in (np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30, 1e15, 1e-30):
            out.append((f"[{mid}]={v}", put(v)))
        out += [("times 3", a * 3), ("negated", -a), ("all 0", np.zeros_like(a))]
    if a.ndim >= 1 and a.shape[0] > 1:
        out += [("rows reversed", a[::-1].copy()), ("rows rolled", np.roll(a, 1, axis=0))]
        perm = np.random.RandomState(rnd.randrange(2**31)).permutation(a.size)
        out.append(("elements permuted", a.reshape(-1)[perm].reshape(a.shape)))
    return out


def _shape_edits(a):
    import numpy as np

    out = [("empty", a[:0]), ("one more row", np.concatenate([a, a[:1]]) if a.size else a[None]),
           ("new axis", a[None])]
    if a.shape and a.shape[0]:
        out.append(("one row less", a[:-1]))
    if a.ndim > 1:
        out += [("flattened", a.reshape(-1)), ("transposed", np.ascontiguousarray(a.T))]
    else:
        out.append(("column", a.reshape(-1, 1)))
    return out


def _array_cases(base, rnd):
    import numpy as np

    from index_files import (array_file, npy_bytes, npy_data, read_array, read_header,
                             replace_file, rewrite_array)

    header = read_header(base)
    cases = []
    for name in sorted(header["arrays"]):
        a = read_array(base, name)
        edits = _value_edits(a, rnd) + _shape_edits(a)
        for t in (bool, np.uint8, np.uint16, np.uint32, np.int32, np.int64, np.float32,
                  np.float64):
            if np.dtype(t) != a.dtype:
                with np.errstate(all="ignore"):
                    edits.append((f"as {np.dtype(t)}", a.astype(t)))
        if a.ndim > 1:
            edits.append(("Fortran order", np.asfortranarray(a)))
        if a.dtype.itemsize > 1:
            edits.append(("big-endian", a.astype(a.dtype.newbyteorder(">"))))
        for what, new in edits:
            cases.append((f"{name}: {what}",
                          lambda p, name=name, new=new: rewrite_array(p, name, new), True))
        for what, new in edits[:2]:  # as damage: checksums left alone
            cases.append((f"{name}: {what} (no checksum)",
                          lambda p, name=name, new=new: rewrite_array(p, name, new, False),
                          False))

        def raw_edit(fn):
            def run(p, name=name):
                f = array_file(p, name)
                with open(f, "rb") as fh:
                    raw = fh.read()
                replace_file(f, fn(raw, f))
            return run

        def flips(raw, f, seed, n_flips, header_only=False):
            r = random.Random(seed)
            raw = bytearray(raw)
            end = raw.index(b"\n") + 1 if header_only else len(raw)
            for _ in range(n_flips):
                i = r.randrange(0, end)
                raw[i] ^= 1 << r.randrange(8)
            return bytes(raw)

        descr = a.dtype.str
        for what, fn in [
            ("3 random bit flips", lambda raw, f: flips(raw, f, rnd.random(), 3)),
            ("header bit flip", lambda raw, f: flips(raw, f, rnd.random(), 1, True)),
            ("header bit flips", lambda raw, f: flips(raw, f, rnd.random(), 4, True)),
            ("truncated", lambda raw, f: raw[:len(raw) // 2]),
            ("header only", lambda raw, f: raw[:raw.index(b"\n") + 1]),
            ("8 bytes more", lambda raw, f: raw + b"\0" * 8),
            ("empty file", lambda raw, f: b""),
            ("garbage", lambda raw, f: b"\x93NUMPY" + bytes(range(256))),
            ("unclosed header", lambda raw, f: npy_bytes(
                f"{{'descr': '{descr}', 'shape': ((", npy_data(f))),
            ("header not a dict", lambda raw, f: npy_bytes("[1, 2, 3]", npy_data(f))),
            ("nested header", lambda raw, f: npy_bytes("(" * 2000 + ")" * 2000, npy_data(f))),
            ("pickled descr", lambda raw, f: npy_bytes(
                f"{{'descr': '|O', 'fortran_order': False, 'shape': {a.shape}, }}",
                npy_data(f))),
            ("claims 2**40 rows", lambda raw, f: npy_bytes(
                f"{{'descr': '{descr}', 'fortran_order': False, "
                f"'shape': {(2**40,) + a.shape[1:]}, }}", npy_data(f))),
        ]:
            cases.append((f"{name}: {what} (no checksum)", raw_edit(fn), False))

        def huge_and_described(p, name=name, shape=(2**40,) + a.shape[1:]):
            raw_edit(lambda raw, f: npy_bytes(
                f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}",
                npy_data(f)))(p)
            from index_files import edit_header
            edit_header(p, lambda h: h["arrays"][name].__setitem__("shape", list(shape)))

        cases.append((f"{name}: claims 2**40 rows, header agrees", huge_and_described, True))
        cases.append((f"{name}: file removed",
                      lambda p, name=name: os.remove(array_file(p, name)), False))
    return cases


# Using an index, and the oracle ------------------------------------------------

def _exhaustive(est):
    if hasattr(est, "n_lists_"):
        est.set_params(n_probe=est.n_lists_)
    if hasattr(est, "links0_"):
        est.set_params(ef_search=max([1, est.codes_.shape[0]]
                                     + [s["ids"].shape[0] for s in est.segments_]))
    return est


def _run(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the outcome is compared
        return ("raised", type(e).__name__, str(e)[:200])


def _ops(est, Q, Xn):
    """What is compared between a loaded index and the original: results
    (or the exception types) of a fixed sequence of calls."""
    import numpy as np

    if not hasattr(est, "kneighbors"):
        out = [_run(lambda: est.transform(Q))]
        out.append(_run(lambda: est.inverse_transform(np.zeros((2, est.codebooks_.shape[0]),
                                                               np.int64))))
        return out
    out = [_run(lambda: est.kneighbors(Q, K))]
    _exhaustive(est)
    out.append(_run(lambda: est.kneighbors(Q, K)))
    out.append(_run(lambda: est.partial_fit(Xn) and None))
    out.append(_run(lambda: est.kneighbors(Q, K)))
    if hasattr(est, "remove"):
        out.append(_run(lambda: est.remove([est.n_samples_fit_ - 1]) and None))
        out.append(_run(lambda: est.kneighbors(Q, K)))
    if hasattr(est, "compact"):
        out.append(_run(lambda: est.compact() and None))
        out.append(_run(lambda: est.kneighbors(Q, K)))
    return out


def _same(a, b):
    import numpy as np

    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x[0] != y[0]:
            return False
        if x[0] == "raised":
            if x[1] != y[1]:
                return False
            continue
        u, v = x[1], y[1]
        if u is None or v is None:
            if u is not v:
                return False
            continue
        if isinstance(u, tuple) != isinstance(v, tuple):
            return False
        for p, q in zip(u if isinstance(u, tuple) else (u,), v if isinstance(v, tuple) else (v,)):
            if not (isinstance(p, np.ndarray) and isinstance(q, np.ndarray)
                    and p.shape == q.shape and p.dtype == q.dtype
                    and np.array_equal(p, q, equal_nan=True)):
                return False
    return True


def _naive_distances(est, Q):
    """(n_queries, n_samples_fit) distances under the fitted metric, from
    the loaded state itself: exact on the raw vectors when re-ranking, else
    on the decoded vectors."""
    import numpy as np

    metric = est.effective_metric_
    Qp = np.asarray(est._prepare(np.asarray(Q, dtype=est._fit_dtype_)), dtype=np.float64)
    tier = est._tier
    exact = est.refine_factor > 0 and (est.vectors_ is not None or tier is not None)
    # The row store holds the raw rows, a tier the prepared ones (decoded
    # here); cosine re-ranks them normalised.
    rows = (None if not exact else np.asarray(est.vectors_) if tier is None
            else tier.take(np.arange(est.n_samples_fit_), est._fit_dtype_))
    V = est._prepare(rows) if exact else est._reconstruct()
    V = np.asarray(V, dtype=np.float64)
    if metric == "dot":
        return -(Qp @ V.T), exact
    D = ((Qp[:, None, :] - V[None]) ** 2).sum(-1)
    if metric == "euclidean":
        D = np.sqrt(D)
    elif metric == "cosine":
        D = D / 2
    return D, exact


def _same_params(a, b):
    import numpy as np

    pa, pb = a.get_params(), b.get_params()
    for k in pa:
        u, v = pa[k], pb[k]
        if isinstance(u, np.random.RandomState) and isinstance(v, np.random.RandomState):
            su, sv = u.get_state(), v.get_state()
            if not (np.array_equal(su[1], sv[1]) and su[2:] == sv[2:]):
                return False
        elif isinstance(u, np.ndarray) or isinstance(v, np.ndarray):
            if not np.array_equal(u, v):
                return False
        elif type(u) is not type(v) or u != v:
            return False
    return True


def _check_answers(est, Q, result, exhaustive):
    """An error message if (dist, ind) is not a valid answer of ``est``."""
    import numpy as np

    if result[0] == "raised":
        live = est.n_samples_fit_ - est.n_removed_
        if result[1] == "ValueError" and "n_neighbors" in result[2] and live < K:
            return None
        if (result[1] == "ValueError" and "refine_factor" in result[2]
                and est.vectors_ is None and est._tier is None and est.refine_factor > 0):
            return None  # as after set_params(refine_factor > 0) on such an index
        return f"raised {result[1]}: {result[2]}"
    dist, ind = result[1]
    n = est.n_samples_fit_
    removed = est.removed_ if est.removed_ is not None else np.zeros(n, bool)
    if ind.shape != (len(Q), K) or dist.shape != ind.shape:
        return f"shapes {dist.shape} {ind.shape}"
    if not ((ind >= 0) & (ind < n)).all():
        return f"ids outside [0, {n}): {ind.min()} .. {ind.max()}"
    if removed[ind].any():
        return "a removed id returned"
    if any(len(set(row)) != K for row in ind):
        return "an id twice in a row"
    if not np.isfinite(dist).all():
        return "non-finite distances"
    D, exact = _naive_distances(est, Q)
    tol = 1e-3 * (1 + np.abs(D).max())
    if not np.allclose(np.take_along_axis(D, ind, 1), dist, rtol=1e-3, atol=tol):
        return "distances are not those of the returned ids"
    if np.any(np.diff(dist, axis=1) < -tol):
        return "distances not sorted"
    if exhaustive and not exact:
        D = np.where(removed[None, :], np.inf, D)
        if not np.allclose(np.sort(D, axis=1)[:, :K], dist, rtol=1e-3, atol=tol):
            return "an exhaustive search missed a nearer vector"
    return None


def _check_valid(est, Q, Xn):
    """Use a loaded index that differs from the original; an error message
    if any answer is wrong."""
    import numpy as np

    if not hasattr(est, "kneighbors"):
        r = _run(lambda: est.transform(Q))
        if r[0] != "ok":
            return f"transform raised {r[1]}: {r[2]}"
        codes, cb = r[1], np.asarray(est.codebooks_, dtype=np.float64)
        m, k, ds = cb.shape
        Qd = np.asarray(Q, dtype=np.float64)
        for j in range(m):
            Dj = ((Qd[:, None, j * ds:(j + 1) * ds] - cb[j][None]) ** 2).sum(-1)
            chosen = Dj[np.arange(len(Q)), codes[:, j]]
            if np.any(chosen > Dj.min(1) + 1e-3 * (1 + Dj.max())):
                return "transform chose a farther codeword"
        back = _run(lambda: est.inverse_transform(codes))
        if back[0] != "ok" or not np.allclose(
                back[1], np.concatenate([cb[j][codes[:, j]] for j in range(m)], axis=1)):
            return "inverse_transform is not the codebook lookup"
        return None
    is_graph = hasattr(est, "links0_")
    problem = _check_answers(est, Q, _run(lambda: est.kneighbors(Q, K)), False)
    if problem:
        return "kneighbors: " + problem
    _exhaustive(est)
    problem = _check_answers(est, Q, _run(lambda: est.kneighbors(Q, K)), not is_graph)
    if problem:
        return "exhaustive kneighbors: " + problem
    r = _run(lambda: est.partial_fit(Xn))
    if r[0] != "ok":
        return f"partial_fit raised {r[1]}: {r[2]}"
    _exhaustive(est)
    problem = _check_answers(est, Q, _run(lambda: est.kneighbors(Q, K)), not is_graph)
    if problem:
        return "after partial_fit: " + problem
    if hasattr(est, "remove"):
        live = np.flatnonzero(~est.removed_) if est.removed_ is not None else np.arange(
            est.n_samples_fit_)
        r = _run(lambda: est.remove(live[-1:]))
        if r[0] != "ok":
            return f"remove raised {r[1]}: {r[2]}"
        problem = _check_answers(est, Q, _run(lambda: est.kneighbors(Q, K)), not is_graph)
        if problem:
            return "after remove: " + problem
    if hasattr(est, "compact"):
        r = _run(lambda: est.compact())
        if r[0] != "ok":
            return f"compact raised {r[1]}: {r[2]}"
        _exhaustive(est)
        problem = _check_answers(est, Q, _run(lambda: est.kneighbors(Q, K)), False)
        if problem:
            return "after compact: " + problem
    return None


def _child(workdir):
    import resource

    import numpy as np

    import pqsk
    from pqsk import IndexFormatError

    # A runaway allocation must fail here, not take the machine.
    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    warnings.simplefilter("ignore")
    rnd = random.Random(0)
    Q = np.random.RandomState(1).randn(N_QUERIES, 8).astype(np.float32)
    Xn = np.random.RandomState(2).randn(12, 8).astype(np.float32)
    progress = open(os.path.join(workdir, "progress.txt"), "w")
    outcomes = {"rejected": 0, "same": 0, "valid": 0}
    failures, valid_cases, n_cases = [], [], 0
    for kind, (factory, X, prepare) in _kinds().items():
        est = factory().fit(X)
        if prepare is not None:
            prepare(est)
        base = os.path.join(workdir, kind)
        pqsk._pages.TOMBSTONE_PAGE = PAGED_IDS if kind.endswith("-paged") else 2**20
        est.save(base)
        Qk = Q.astype(X.dtype)
        Xk = Xn.astype(X.dtype)
        original = _ops(pickle.loads(pickle.dumps(est)), Qk, Xk)
        cases = _header_cases(base, rnd) + _manifest_cases(base) + _array_cases(base, rnd)
        for i, (what, tamper, recomputed) in enumerate(cases):
            case = f"{kind} #{i}: {what}"
            progress.write(case + "\n")
            progress.flush()
            n_cases += 1
            path = os.path.join(workdir, "case")
            shutil.rmtree(path, ignore_errors=True)
            # Hard links: every tampering writes new files (index_files.replace_file).
            shutil.copytree(base, path, copy_function=os.link)
            try:
                tamper(path)
            except Exception as e:  # noqa: BLE001 - a tampering that cannot apply
                failures.append(f"{case}: tampering failed: {e!r}")
                continue
            mmap_mode = "r" if i % 4 == 0 else None
            try:
                loaded = pqsk.load(path, mmap_mode=mmap_mode)
            except IndexFormatError:
                outcomes["rejected"] += 1
                continue
            except Exception as e:  # noqa: BLE001
                failures.append(f"{case}: load raised {type(e).__name__}: {e}")
                continue
            if loaded._structural_mismatch() is not None:  # issue 21
                failures.append(f"{case}: loaded with {loaded._structural_mismatch()}, "
                                "a structural parameter contradicting the arrays")
                continue
            ref = original
            if not _same_params(loaded, est):
                # Parameters may change as with set_params: compare with that.
                twin = pickle.loads(pickle.dumps(est))
                twin.set_params(**loaded.get_params())
                ref = _ops(twin, Qk, Xk)
            if _same(_ops(loaded, Qk, Xk), ref):
                outcomes["same"] += 1
                continue
            if not recomputed:
                failures.append(f"{case}: damage went undetected (answers changed)")
                continue
            problem = _check_valid(pqsk.load(path), Qk, Xk)
            if problem:
                failures.append(f"{case}: {problem}")
            else:
                outcomes["valid"] += 1
                valid_cases.append(case)
        # The tamperings wrote new files, never through the hard links.
        if not _same(_ops(pqsk.load(base), Qk, Xk), original):
            failures.append(f"{kind}: the saved original was modified by the cases")
    shutil.rmtree(os.path.join(workdir, "case"), ignore_errors=True)
    return {"cases": n_cases, "outcomes": outcomes, "failures": failures,
            "valid_cases": valid_cases}

if __name__ == "__main__":
    sys.path.insert(0, HERE)
    print(json.dumps(_child(sys.argv[1])))

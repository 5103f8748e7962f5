"""Hostile input over real HTTP, on SQLite and PostgreSQL: malformed and
oversized uploads to ``POST /v1/jobs`` (the only upload route), bodies that
lie about their size or never end, archives, path-traversal names, and
unicode edge cases in /v1/link mentions.

Every refusal is a 4xx problem document whose detail names what, where and
how to fix, and leaves the registry (jobs, versions, tasks, ontologies,
task states, audit rows), the artifact folder and the staging folder exactly
as they were: the whole data folder is listed before and after. An accepted
upload adds one job, its audit rows and one staged folder, nothing else.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile_helpers import (
    BOUNDARY,
    CANDS,
    FORM,
    ONTOLOGY,
    QUERIES,
    Env,
    Upload,
    endless,
    jsonl_bytes,
    multipart,
    problem,
    raw_post,
    staged_uploads,
    zip_bomb,
)
from service_factories import (
    admin,
    live_server,
    make_registry,
    private_pg_database,
    register_version,
    service_settings,
    wait_until,
)

from kronlink.registry import get_job
from service import create_app

LIMIT = 256 * 1024  # KRONLINK_MAX_UPLOAD_BYTES here: big enough for every valid case


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One live server per backend for the module, with version 1 served."""
    root = tmp_path_factory.mktemp(f"hostile-{request.param}")
    with ExitStack() as stack:
        overrides: dict[str, Any] = {"max_upload_bytes": LIMIT}
        if request.param == "postgresql":
            overrides["database_url"] = stack.enter_context(private_pg_database("kronlink_hostile"))
        reg = make_registry(service_settings(root, **overrides))
        stack.callback(reg.factory.kw["bind"].dispose)
        v = register_version(reg.factory, reg.store, seed=1)
        live = stack.enter_context(live_server(create_app(reg.settings, enqueue=reg.sent.append)))
        with live.client() as c:
            wait_until(lambda: c.get("/readyz").status_code == 200)
        yield Env(live.url, root, reg.settings.staging_path, reg.factory, reg.sent, v.id)


# -- uploads ---------------------------------------------------------------------
def _line(row: dict[str, Any]) -> bytes:
    return json.dumps(row).encode() + b"\n"


def _q(**changes: Any) -> bytes:
    """The valid queries with the first row changed (None removes a field)."""
    row = {**QUERIES[0], **changes}
    return _line({k: v for k, v in row.items() if v is not None}) + jsonl_bytes(QUERIES[1:])


def _task(name: str) -> Upload:
    return Upload(form={**FORM, "task": name})


# (id, upload, status, kind, words the detail must hold, errors[0].loc)
# fmt: off
REFUSED: list[tuple[str, Upload, int, str, tuple[str, ...], str | None]] = [
    ("truncated-jsonl", Upload(queries=jsonl_bytes(QUERIES)[:-25]), 422, "invalid-dataset",
     ("queries.jsonl, line 4", "malformed JSON"), "form.queries:4"),
    ("invalid-utf8-queries", Upload(queries=_line(QUERIES[0]) + b'{"mention": "\xff\xfe"}\n'),
     422, "invalid-dataset", ("queries.jsonl, line 2", "invalid UTF-8: byte 0xff"),
     "form.queries:2"),
    ("invalid-utf8-ontology", Upload(ontology=jsonl_bytes(ONTOLOGY[:2]) + b'{"id": "\xc3("}\n'),
     422, "invalid-dataset", ("ontology.jsonl, line 3", "invalid UTF-8"), "form.ontology:3"),
    ("overlong-utf8-slash", Upload(queries=b'{"mention": "a\xc0\xafb"}\n'), 422,
     "invalid-dataset", ("queries.jsonl, line 1", "invalid UTF-8: byte 0xc0"), "form.queries:1"),
    ("utf8-encoded-surrogate", Upload(queries=b'{"mention": "\xed\xa0\x80"}\n'), 422,
     "invalid-dataset", ("queries.jsonl, line 1", "invalid UTF-8: byte 0xed"), "form.queries:1"),
    ("lone-surrogate-escape", Upload(queries=_q(mention="fever \ud800")), 422, "invalid-dataset",
     ("queries.jsonl, line 1, field mention", "unpaired surrogate"), "form.queries:1.mention"),
    ("lone-surrogate-in-ontology",
     Upload(ontology=_line({"id": "C1", "name": "\udfff"}) + jsonl_bytes(ONTOLOGY[1:])),
     422, "invalid-dataset", ("ontology.jsonl, line 1, field name", "unpaired surrogate"),
     "form.ontology:1.name"),
    ("empty-queries", Upload(queries=b""), 422, "invalid-dataset",
     ("queries.jsonl", "no queries"), "form.queries"),
    ("blank-lines-only", Upload(queries=b"\n  \r\n\n"), 422, "invalid-dataset",
     ("queries.jsonl", "no queries"), "form.queries"),
    ("no-test-split", Upload(queries=jsonl_bytes(QUERIES[:3])), 422, "invalid-dataset",
     ("queries.jsonl, field split", "train, dev and test", "got train 2, dev 1, test 0"),
     "form.queries.split"),
    ("no-split-at-all",
     Upload(queries=jsonl_bytes([{k: v for k, v in q.items() if k != "split"} for q in QUERIES])),
     422, "invalid-dataset", ("got train 0, dev 0, test 0 (and 4 without a split)",),
     "form.queries.split"),
    ("empty-ontology", Upload(ontology=b""), 422, "invalid-dataset",
     ("ontology.jsonl", "empty ontology"), "form.ontology"),
    ("huge-line-not-json", Upload(queries=b"x" * (LIMIT - 10)), 422, "invalid-dataset",
     ("queries.jsonl, line 1", "malformed JSON"), "form.queries:1"),
    ("huge-line-over-limit", Upload(queries=b"{" * (LIMIT + 1)), 413, "payload-too-large",
     ("'queries' exceeds 262144 bytes", "KRONLINK_MAX_UPLOAD_BYTES"), None),
    ("mention-not-string", Upload(queries=_q(mention=5)), 422, "invalid-dataset",
     ("line 1, field mention", "expected a string, got int"), "form.queries:1.mention"),
    ("mention-nan", Upload(queries=b'{"mention": NaN, "gold": "C1"}\n'), 422, "invalid-dataset",
     ("line 1, field mention", "got float"), "form.queries:1.mention"),
    ("missing-gold", Upload(queries=_q(gold=None)), 422, "invalid-dataset",
     ("line 1, field gold", "missing"), "form.queries:1.gold"),
    ("candidates-not-list", Upload(queries=_q(candidates="C1")), 422, "invalid-dataset",
     ("line 1, field candidates", "expected a list"), "form.queries:1.candidates"),
    ("candidate-id-int", Upload(queries=_q(candidates=[{"id": 1, "name": "x"}])), 422,
     "invalid-dataset", ("field candidates[0].id", "expected a string, got int"),
     "form.queries:1.candidates[0].id"),
    ("duplicate-candidate", Upload(queries=_q(candidates=[CANDS[0], CANDS[0]])), 422,
     "invalid-dataset", ("field candidates[1].id", "duplicate candidate"),
     "form.queries:1.candidates[1].id"),
    ("gold-not-in-ontology", Upload(queries=_q(gold="C9")), 422, "invalid-dataset",
     ("line 1, field gold", "expected an id of the ontology, got 'C9'"), "form.queries:1.gold"),
    ("candidate-not-in-ontology",
     Upload(queries=_q(candidates=[CANDS[0], {"id": "Z9", "name": "z"}])), 422,
     "invalid-dataset", ("field candidates[1].id", "'Z9'"), "form.queries:1.candidates[1].id"),
    ("train-gold-not-candidate", Upload(queries=_q(candidates=[CANDS[1]])), 422,
     "invalid-dataset", ("line 1, field gold", "not among the 1 candidates"),
     "form.queries:1.gold"),
    ("unknown-split", Upload(queries=_q(split="validation")), 422, "invalid-dataset",
     ("line 1, field split", "expected one of train, dev, test"), "form.queries:1.split"),
    ("array-line", Upload(queries=b"[1, 2]\n"), 422, "invalid-dataset",
     ("queries.jsonl, line 1", "expected a JSON object, got list"), "form.queries:1"),
    ("duplicate-concept-id", Upload(ontology=jsonl_bytes([ONTOLOGY[0], ONTOLOGY[0]])), 422,
     "invalid-dataset", ("ontology.jsonl, line 2, field id", "duplicate concept id 'C1'"),
     "form.ontology:2.id"),
    ("synonyms-not-list",
     Upload(ontology=_line({"id": "C1", "name": "f", "synonyms": "p"}) + jsonl_bytes(ONTOLOGY[1:])),
     422, "invalid-dataset", ("ontology.jsonl, line 1, field synonyms", "expected a list"),
     "form.ontology:1.synonyms"),
    ("zip-bomb", Upload(queries=zip_bomb(), filename="queries.zip"), 415,
     "unsupported-media-type", ("'queries'", "zip archive", "uncompressed"), "form.queries"),
    ("gzip-queries", Upload(queries=gzip.compress(jsonl_bytes(QUERIES))), 415,
     "unsupported-media-type", ("'queries'", "gzip"), "form.queries"),
    ("xz-ontology", Upload(ontology=lzma.compress(jsonl_bytes(ONTOLOGY))), 415,
     "unsupported-media-type", ("'ontology'", "xz"), "form.ontology"),
    ("bzip2-queries", Upload(queries=bz2.compress(jsonl_bytes(QUERIES))), 415,
     "unsupported-media-type", ("'queries'", "bzip2"), "form.queries"),
    ("gzip-content-encoding", Upload(headers={"content-encoding": "gzip"}, gzip_body=True), 415,
     "unsupported-media-type", ("Content-Encoding gzip", "uncompressed"), None),
    ("task-dotdot", _task("../x"), 422, "validation-error", ("form.task", "'/'"), "form.task"),
    ("task-slash", _task("a/b"), 422, "validation-error", ("form.task", "'/'"), "form.task"),
    ("task-backslash", _task("a\\b"), 422, "validation-error", ("form.task",), "form.task"),
    ("task-is-dotdot", _task(".."), 422, "validation-error", ("form.task", "'.'"), "form.task"),
    ("task-hidden", _task(".x"), 422, "validation-error", ("form.task", "'.'"), "form.task"),
    ("task-nul", _task("x\x00y"), 422, "validation-error", ("form.task", "control"), "form.task"),
    ("task-newline", _task("x\ny"), 422, "validation-error", ("form.task", "control"),
     "form.task"),
    ("task-101-chars", _task("t" * 101), 422, "validation-error", ("form.task", "100"),
     "form.task"),
    ("task-too-many-bytes", _task("\U0001f912" * 60), 422, "validation-error",
     ("form.task", "200 bytes"), "form.task"),
    ("task-not-utf8", Upload(form={**FORM, "task": b"\xff\xfe"}), 422, "validation-error",
     ("'task'", "not UTF-8"), "form.task"),
    ("lineage-dotdot", Upload(form={**FORM, "lineage": "../main"}), 422, "validation-error",
     ("form.lineage",), "form.lineage"),
    ("ontology-name-slash", Upload(form={**FORM, "ontology_name": "a/b"}), 422,
     "validation-error", ("form.ontology_name",), "form.ontology_name"),
    ("filename-over-header-limit", Upload(filename="q" * 5000), 400, "validation-error",
     ("malformed multipart body", "Maximum header size"), None),
    ("declared-sizes-as-file",
     Upload(files=(("queries", "q.jsonl", jsonl_bytes(QUERIES)),
                   ("ontology", "o.jsonl", jsonl_bytes(ONTOLOGY)),
                   ("task", "task.json", b'{"format_version": 1, "sizes": {"concepts": 99}}'))),
     422, "validation-error", ("unexpected file part 'task'",), "form.task"),
    ("queries-twice",
     Upload(files=(("queries", "q.jsonl", jsonl_bytes(QUERIES)),
                   ("queries", "q.jsonl", jsonl_bytes(QUERIES[:1])),
                   ("ontology", "o.jsonl", jsonl_bytes(ONTOLOGY)))),
     422, "validation-error", ("'queries' sent twice",), "form.queries"),
    ("part-name-traversal",
     Upload(files=(("../queries", "q.jsonl", b"{}"), ("ontology", "o.jsonl", b"{}"))), 422,
     "validation-error", ("unexpected file part '../queries'",), "form.../queries"),
    ("part-name-nul",
     Upload(files=(("queries\x00", "q.jsonl", b"{}"), ("ontology", "o.jsonl", b"{}"))), 422,
     "validation-error", ("unexpected file part",), None),
]
# fmt: on


@pytest.mark.parametrize(
    ("upload", "status", "kind", "needles", "loc"),
    [c[1:] for c in REFUSED],
    ids=[c[0] for c in REFUSED],
)
def test_a_hostile_upload_is_refused_and_changes_nothing(
    env: Env, upload: Upload, status: int, kind: str, needles: tuple[str, ...], loc: str | None
) -> None:
    before, sent = env.snap(), len(env.sent)
    body, headers = upload.body()
    with env.client() as c:
        r = c.post("/v1/jobs", content=body, headers=headers)
    p = problem(r, status, kind)
    for needle in needles:
        assert needle in p["detail"], (needle, p["detail"])
    if loc is not None:
        assert p["errors"][0]["loc"] == loc, p
    assert "nothing was stored" in p["detail"] or status != 422 or kind != "invalid-dataset"
    assert str(env.root) not in p["detail"]  # the server's folders are nobody's business
    assert r.elapsed.total_seconds() < 5  # an archive is never unpacked
    assert before.diff(env.snap()) == {}
    assert staged_uploads(env.staging) == [] and len(env.sent) == sent


ABS = f"/tmp/kronlink-hostile-{uuid.uuid4().hex}/passwd"
# (id, upload): valid data with hostile names or encodings that must be accepted
ACCEPTED: list[tuple[str, Upload]] = [
    ("crlf", Upload(form={**FORM, "task": "crlf"}, queries=jsonl_bytes(QUERIES).replace(b"\n", b"\r\n"))),
    ("bom", Upload(form={**FORM, "task": "bom"}, queries=b"\xef\xbb\xbf" + jsonl_bytes(QUERIES),
                   ontology=b"\xef\xbb\xbf" + jsonl_bytes(ONTOLOGY))),
    ("filename-traversal", Upload(form={**FORM, "task": "ft"}, filename="../../etc/passwd")),
    ("filename-absolute", Upload(form={**FORM, "task": "fa"}, filename=ABS)),
    ("filename-nul", Upload(form={**FORM, "task": "fn"}, filename="q\x00/../../x.jsonl")),
    ("filename-long", Upload(form={**FORM, "task": "fl"}, filename="q" * 3000 + ".jsonl")),
    ("filename-unicode", Upload(form={**FORM, "task": "fu"}, filename="données ✓ 🤒.jsonl")),
    ("task-unicode", _task("糖尿病 type 2 — ü\u0301")),
    ("task-100-chars", _task("t" * 100)),
]  # fmt: skip


@pytest.mark.parametrize("upload", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_valid_data_under_hostile_names_is_staged_inside_staging_only(
    env: Env, upload: Upload
) -> None:
    before, sent = env.snap(), len(env.sent)
    body, headers = upload.body()
    with env.client() as c:
        r = c.post("/v1/jobs", content=body, headers=headers)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["options"]["task_name"] == upload.form["task"]
    after = env.snap()
    diff = before.diff(after)
    assert set(diff) == {"jobs", "audit_log", "files"}, diff
    assert [row[0] for row in diff["jobs"]["new"]] == [job["id"]] and not diff["jobs"]["gone"]
    assert {row[2] for row in diff["audit_log"]["new"]} == {f"job:{job['id']}"}
    with env.factory.begin() as s:
        staged_id = get_job(s, job["id"]).payload["staged_id"]
    folder = f"data/staging/{staged_id}"
    assert diff["files"] == {
        "new": sorted(
            [folder] + [f"{folder}/{n}" for n in ("ontology.jsonl", "queries.jsonl", "task.json")]
        ),
        "gone": [],
    }
    # stored as uploaded, byte for byte, under the fixed name and nowhere else
    assert (env.staging / staged_id / "queries.jsonl").read_bytes() == upload.queries
    assert not Path(ABS).exists() and not Path(ABS).parent.exists()
    assert staged_uploads(env.staging) == [] and len(env.sent) == sent + 1


# -- bodies that lie about their size or never end -------------------------------
def test_a_billion_row_claim_is_refused_before_a_byte_is_read(env: Env) -> None:
    before = env.snap()
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    r = raw_post(
        env.url,
        "/v1/jobs",
        {**admin(), "content-type": ctype, "content-length": str(10**12)},
        [],
    )
    assert r.status == 413 and r.headers["content-type"] == "application/problem+json"
    detail = r.json()["detail"]
    assert "declares 1000000000000 bytes" in detail and "KRONLINK_MAX_UPLOAD_BYTES" in detail
    assert r.seconds < 2
    # the same claim on a JSON route: the middleware refuses it
    j = raw_post(
        env.url,
        "/v1/link",
        {"content-type": "application/json", "content-length": str(10**12)},
        [],
    )
    assert j.status == 413 and "declares 1000000000000 bytes" in j.json()["detail"]
    assert before.diff(env.snap()) == {} and staged_uploads(env.staging) == []


def test_a_part_that_never_ends_is_cut_off_at_the_limit(env: Env) -> None:
    """1 GB offered in a chunked body (no Content-Length): the server reads
    about the limit, answers 413 and stops; the client stops when it sees it."""
    before = env.snap()
    head, ctype = multipart({"task": "endless"}, [])
    head = head[: -len(f"--{BOUNDARY}--\r\n")]
    head += (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="queries"; '
        'filename="q.jsonl"\r\n\r\n'
    ).encode()
    offered = 10**9
    r = raw_post(
        env.url,
        "/v1/jobs",
        {**admin(), "content-type": ctype},
        [head, *endless(b'{"mention": "x"}\n' * 4000, offered)],
        chunked=True,
    )
    assert r.status == 413, r.body
    assert "'queries' exceeds 262144 bytes" in r.json()["detail"]
    # what was sent before the answer: the limit plus what the sockets buffer
    assert r.sent < 16 * 1024 * 1024, r.sent
    print(f"endless part: 413 after {r.sent} bytes sent of {offered}, {r.seconds:.2f} s")
    wait_until(lambda: staged_uploads(env.staging) == [], timeout_s=5)
    assert before.diff(env.snap()) == {}


def test_a_json_body_that_never_ends_is_cut_off(env: Env) -> None:
    chunks = [b'{"mention": "', *endless(b"a" * 65536, 10**9)]
    r = raw_post(env.url, "/v1/link", {"content-type": "application/json"}, chunks, chunked=True)
    assert r.status == 413 and "KRONLINK_MAX_REQUEST_BYTES" in r.json()["detail"]
    assert r.sent < 16 * 1024 * 1024, r.sent


# -- unicode in /v1/link -----------------------------------------------------------
# The contract (docs/service.md): a mention is 1..KRONLINK_MAX_MENTION_CHARS (500)
# characters of valid Unicode with at least one visible character; anything
# else is a 422 naming the field. A 100k-character mention is over the limit:
# 422, not truncated, so a caller never gets an answer for a text it did not send.
UCANDS = [
    {"id": "C1", "name": "fever"},
    {"id": "C2", "name": "asthma"},
    {"id": "热-🤒", "name": "发热 🤒 حمى"},
    {"id": "C4", "name": "cafe\u0301 \u200fRTL\u200e"},
]
VALID_MENTIONS = {
    "ascii": "high fever",
    "combining": "cafe\u0301 fe\u0300ver",
    "rtl-marks": "\u200fحمى\u200e fever",
    "rtl-override": "\u202efever\u202c",
    "emoji": "🤒 fever",
    "zwj-sequence": "👩\u200d⚕️ asthma",
    "zero-width-inside": "fe\u200bver",
    "cjk": "发热",
    "nul-inside": "fe\u0000ver",
    "bom-char": "\ufefffever",
    "max-code-point": "\U0010ffff x",
    "at-the-limit": "é" * 500,
}


def _post(c: httpx.Client, path: str, obj: Any) -> httpx.Response:
    # json.dumps writes lone surrogates as \ud800 escapes, as a hostile client would
    return c.post(path, content=json.dumps(obj), headers={"content-type": "application/json"})


def _ranked(results: list[dict[str, Any]], ids: list[str]) -> None:
    assert sorted(r["id"] for r in results) == sorted(ids)
    assert [r["rank"] for r in results] == list(range(1, len(ids) + 1))
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert abs(sum(r["probability"] for r in results) - 1) < 1e-4


@pytest.mark.parametrize("mention", VALID_MENTIONS.values(), ids=VALID_MENTIONS.keys())
def test_valid_unicode_mentions_get_ranked_candidates(env: Env, mention: str) -> None:
    with env.client() as c:
        r = _post(c, "/v1/link", {"mention": mention, "candidates": UCANDS})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"]["id"] == env.version_id
        _ranked(r.json()["results"], [x["id"] for x in UCANDS])
        # BM25 candidates from the stored ontology: never a 5xx; a mention
        # sharing no word with the ontology is an explicit no-match
        bm = _post(c, "/v1/link", {"mention": mention, "ontology": "toy", "top_k": 3})
        assert bm.status_code == 200, bm.text
        body = bm.json()
        assert len(body["results"]) <= 3
        assert body["no_match"] or body["results"]


INVALID_MENTIONS: list[tuple[str, Any, str, str]] = [
    # (id, mention, loc, words in the message)
    ("empty", "", "body.mention", "at least 1 character"),
    ("spaces", "  \t\n ", "body.mention", "visible character"),
    ("ideographic-space", "\u3000", "body.mention", "visible character"),
    ("zero-width-only", "\u200b\u200d\u200f", "body.mention", "visible character"),
    ("nul-only", "\u0000", "body.mention", "visible character"),
    ("lone-high-surrogate", "fever \ud800", "body.mention", "unpaired surrogate"),
    ("lone-low-surrogate", "\udfff", "body.mention", "unpaired surrogate"),
    ("reversed-pair", "\udd12\ud83e", "body.mention", "unpaired surrogate"),
    ("100k-chars", "x" * 100_000, "body.mention", "at most 500 characters"),
    ("501-chars", "é" * 501, "body.mention", "at most 500 characters"),
    ("int", 5, "body.mention", "valid string"),
    ("null", None, "body.mention", "valid string"),
    ("list", ["fever"], "body.mention", "valid string"),
    ("object", {"a": 1}, "body.mention", "valid string"),
    ("bool", True, "body.mention", "valid string"),
]


@pytest.mark.parametrize(
    ("mention", "loc", "words"),
    [c[1:] for c in INVALID_MENTIONS],
    ids=[c[0] for c in INVALID_MENTIONS],
)
def test_invalid_mentions_get_a_422_naming_the_field(
    env: Env, mention: Any, loc: str, words: str
) -> None:
    with env.client() as c:
        p = problem(_post(c, "/v1/link", {"mention": mention, "candidates": UCANDS}), 422)
        assert p["errors"][0]["loc"] == loc and words in p["errors"][0]["message"], p
        assert loc in p["detail"] and words in p["detail"]
        # the same item inside a batch: named by its index
        batch = {"items": [{"mention": "fever", "candidates": UCANDS}] * 2}
        batch["items"].append({"mention": mention, "candidates": UCANDS})
        p = problem(_post(c, "/v1/link/batch", batch), 422)
        assert p["errors"][0]["loc"] == "body.items[2]." + loc.removeprefix("body."), p


def test_surrogates_in_other_fields_and_bytes_that_are_not_utf8(env: Env) -> None:
    with env.client() as c:
        for body, loc in (
            ({"mention": "x", "left_context": "\udc00", "candidates": UCANDS}, "body.left_context"),
            (
                {"mention": "x", "candidates": [{"id": "\ud800", "name": "a"}]},
                "body.candidates[0].id",
            ),
            (
                {"mention": "x", "candidates": [{"id": "a", "name": "\ud800"}]},
                "body.candidates[0].name",
            ),
            ({"mention": "x", "ontology": "to\ud800y"}, "body.ontology"),
        ):
            p = problem(_post(c, "/v1/link", body), 422, "validation-error")
            assert p["errors"][0]["loc"] == loc and "unpaired surrogate" in p["detail"], p
        raw = b'{"mention": "fe\xffver", "candidates": [{"id": "a", "name": "b"}]}'
        r = c.post("/v1/link", content=raw, headers={"content-type": "application/json"})
        p = problem(r, 400, "malformed-json")
        assert "UTF-8" in p["detail"]
        # 100k emoji: 1.2 MB as \\u escapes, over the body limit before any parsing
        big = _post(c, "/v1/link", {"mention": "🤒" * 100_000, "candidates": UCANDS})
        assert "KRONLINK_MAX_REQUEST_BYTES" in problem(big, 413, "payload-too-large")["detail"]


def test_batches_of_zero_too_many_and_mixed_unicode(env: Env) -> None:
    with env.client() as c:
        p = problem(_post(c, "/v1/link/batch", {"items": []}), 422, "validation-error")
        assert p["errors"][0]["loc"] == "body.items" and "at least 1" in p["detail"]
        over = {"items": [{"mention": "x", "candidates": UCANDS}] * 257}
        p = problem(_post(c, "/v1/link/batch", over), 422, "validation-error")
        assert p["errors"][0]["loc"] == "body.items" and "at most 256" in p["detail"]
        for bad in (None, {}, "items", [{"mention": "x", "candidates": UCANDS}]):
            problem(_post(c, "/v1/link/batch", bad), 422, "validation-error")
        items = [{"mention": m, "candidates": UCANDS} for m in VALID_MENTIONS.values()]
        r = _post(c, "/v1/link/batch", {"items": items})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"]["id"] == env.version_id
        assert len(r.json()["items"]) == len(items)
        for item in r.json()["items"]:
            _ranked(item["results"], [x["id"] for x in UCANDS])
        # a batch answers each item as /v1/link does
        single = _post(c, "/v1/link", items[4]).json()["results"]
        assert [x["id"] for x in single] == [x["id"] for x in r.json()["items"][4]["results"]]

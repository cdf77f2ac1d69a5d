"""eagle3 regenerate: the target's own answers replace the data's, resumably, locally or from a server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from eagle3.cli import main
from eagle3.decoding.generate import generate


def write_data(path, n):
    rows = [{"conversations": [{"from": "human", "value": f"Tom had {i} red"}, {"from": "gpt", "value": "ORIGINAL"},
                               {"from": "human", "value": "Then"}, {"from": "gpt", "value": "ORIGINAL"}]}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_local_regeneration_is_the_targets_answer_and_resumes(tmp_path, stories, capsys):
    data, out = tmp_path / "data.jsonl", tmp_path / "regen.jsonl"
    write_data(data, 3)
    args = ["regenerate", "--target", "stories260k", "--data", str(data), "--out", str(out), "--max-new-tokens", "12"]
    assert main(args + ["--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 2
    out.write_text(out.read_text() + '{"source_index": 9, "conv')  # a torn line, as if killed mid-write
    assert main(args) == 0  # resumes: only the third conversation is new
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 1 and summary["done_before"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.startswith('{"source_index": ')
            and line.endswith("}")]  # fmt: skip
    assert sorted(r["source_index"] for r in rows) == [0, 1, 2]
    first = next(r for r in rows if r["source_index"] == 0)["conversations"]
    assert [t["from"] for t in first] == ["human", "gpt", "human", "gpt"]
    expected = generate(stories, stories.encode("Tom had 0 red"), 12).text
    assert first[1]["value"] == expected and "ORIGINAL" not in first[3]["value"]


def test_endpoint_regeneration_with_a_loopback_server(tmp_path, capsys):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            reply = {"choices": [{"message": {"role": "assistant", "content": f"echo {len(body['messages'])}"}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        data, out = tmp_path / "data.jsonl", tmp_path / "regen.jsonl"
        write_data(data, 4)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["regenerate", "--endpoint", url, "--model", "big-model", "--data", str(data), "--out", str(out),
                     "--max-new-tokens", "7", "--concurrency", "2"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and len(seen) == 8
    assert all(r["conversations"][1]["value"] == "echo 1" and r["conversations"][3]["value"] == "echo 3" for r in rows)
    assert seen[0]["model"] == "big-model" and seen[0]["max_tokens"] == 7
    # The second request of a conversation carries the regenerated first answer.
    assert any(m["content"] == "echo 1" for body in seen for m in body["messages"] if m["role"] == "assistant")


def test_local_regeneration_runs_on_the_native_runtime(tmp_path, capsys):
    from eagle3.runtimes import native
    from eagle3.runtimes.target import load_target

    if native.library() is None:
        import pytest

        pytest.skip(f"eagle3's native kernels are unavailable here: {native.why_unavailable()}")
    data, out = tmp_path / "data.jsonl", tmp_path / "regen.jsonl"
    write_data(data, 2)
    assert main(["regenerate", "--target", "stories260k", "--data", str(data), "--out", str(out), "--max-new-tokens",
                 "12", "--runtime", "native", "--threads", "1"]) == 0  # fmt: skip
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["source_index"])
    target = load_target("stories260k", runtime="native")
    assert rows[0]["conversations"][1]["value"] == generate(target, target.encode("Tom had 0 red"), 12).text

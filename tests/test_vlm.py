"""VLM post-processing (vss/vlm.py, MVC section 2.5) against a real local HTTP server that speaks
the OpenAI chat-completions API."""

import base64
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import json
import logging
import threading
import warnings

import cv2
import numpy as np
import openai
import pytest

from vss.io import load_class_names
from vss.vlm import (
    AmbiguityGroup,
    correct_video,
    format_prompt,
    load_groups,
    make_client,
    OUTLINE_RGB,
    parse_answer,
)

KEY = "sk-test-SECRET0123456789abcdef"
PROMPT = "Is the water in the image a river, lake or sea? Please give me the only answer."
NAMES, _ = load_class_names()  # the 124 VSPW classes
RIVER, LAKE, SEA, SKY = (NAMES.index(c) for c in ("river", "lake", "sea", "sky"))
T, H, W = 4, 24, 32


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server API)
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.arrived:
            srv.requests.append(
                {
                    "path": self.path,
                    "auth": self.headers.get("Authorization"),
                    "read_timeout": self.headers.get("X-Stainless-Read-Timeout"),  # the SDK's own
                    "body": body,
                }
            )
            srv.arrived.notify_all()
        if srv.hold:  # answer only once the test is over (the cap only ends a broken test)
            srv.release.wait(timeout=120)
        srv.answered += 1
        if srv.status != 200:
            payload = {"error": {"message": srv.error_message, "type": "error", "code": srv.status}}
        else:
            payload = {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": srv.answer},
                    }
                ],
            }
        data = json.dumps(payload).encode()
        try:
            self.send_response(srv.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests, srv.arrived, srv.status = [], threading.Condition(), 200
    srv.hold, srv.release, srv.answered = False, threading.Event(), 0
    srv.answer, srv.error_message = "The water in the image is a lake.", "server error"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key=KEY)


def make_video():
    """Sky on top, 'river' water below whose size grows over frames, plus some 'lake' pixels."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    labels = np.full((T, H, W), SKY, np.int64)
    for t, top in enumerate([16, 12, 18, 10]):  # region sizes: frame 3 > 1 > 0 > 2
        labels[t, top:] = RIVER
    labels[1, 20:, :8] = LAKE
    labels[0, 0, 0] = 255  # ignore stays ignore
    return frames, labels


def run(client, **kw):
    frames, labels = make_video()
    args = dict(
        model="test-vlm",
        video_name="vid",
        cache_dir=None,
        timeout=5.0,
        retries=0,
        backoff=0.0,
        min_pixels=10,
    )
    args.update(kw)
    return correct_video(frames, labels, NAMES, load_groups(class_names=NAMES), client, **args)


def test_region_relabelled_in_every_frame(server, client):
    server.answer = "It is the sea."  # neither of the predicted classes: every pixel must change
    frames, labels = make_video()
    new, report = run(client)
    water = np.isin(labels, [RIVER, LAKE, SEA])
    assert (new[water] == SEA).all() and water.any()
    np.testing.assert_array_equal(new[~water], labels[~water])  # sky and ignore untouched
    assert new.dtype == labels.dtype
    entry = report["water"]
    assert entry["status"] == "relabelled" and entry["choice"] == "sea" and not entry["cached"]
    assert entry["frames"] == [0, 1, 3] and entry["pixels"] == int(water.sum())
    assert sorted(entry["classes_present"]) == ["lake", "river"]

    # the request: one POST, the exact prompt, 3 PNG data URLs with the region outlined
    assert len(server.requests) == 1
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["body"]["model"] == "test-vlm"
    (message,) = req["body"]["messages"]
    texts = [c["text"] for c in message["content"] if c["type"] == "text"]
    urls = [c["image_url"]["url"] for c in message["content"] if c["type"] == "image_url"]
    assert texts == [PROMPT] and len(urls) == 3
    for t, url in zip([0, 1, 3], urls):
        assert url.startswith("data:image/png;base64,")
        png = np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8)
        img = cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert img.shape == (H, W, 3)
        outline = (img == OUTLINE_RGB).all(-1)
        assert outline.any()
        # the outline is drawn along the region boundary, the rest is the frame itself
        boundary_rows = np.nonzero(outline.any(1))[0]
        first_water_row = np.nonzero(water[t].any(1))[0][0]
        assert abs(boundary_rows.min() - first_water_row) <= 2
        np.testing.assert_array_equal(img[~outline][:50], frames[t][~outline][:50])


def test_cache_sends_no_second_request(server, client, tmp_path):
    new1, rep1 = run(client, cache_dir=tmp_path / "cache")
    assert len(server.requests) == 1 and not rep1["water"]["cached"]
    server.answer = "sea"  # would change the result if asked again
    new2, rep2 = run(client, cache_dir=tmp_path / "cache")
    assert len(server.requests) == 1 and rep2["water"]["cached"]
    np.testing.assert_array_equal(new1, new2)
    files = list((tmp_path / "cache").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["answer"].endswith("lake.")
    # another video name is another key
    run(client, cache_dir=tmp_path / "cache", video_name="other")
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "setup, match",
    [
        (dict(status=500), "InternalServerError"),
        (dict(answer="I cannot tell from this picture."), "no single class"),
        (dict(answer="Is it a river, lake or sea? Hard to say."), "no single class"),
    ],
)
def test_failures_leave_labels_unchanged(server, client, setup, match):
    for k, v in setup.items():
        setattr(server, k, v)
    frames, labels = make_video()
    with pytest.warns(RuntimeWarning, match=match):
        new, report = run(client, retries=2)
    np.testing.assert_array_equal(new, labels)
    assert report["water"]["status"] in ("failed", "unparsed")
    # a 500 is retried (retries=2 -> 3 attempts); an answer is not
    assert len(server.requests) == (3 if setup.get("status") == 500 else 1)


def test_timeout_leaves_labels_unchanged(server, client, caplog):
    """A server that never answers: each attempt gives up on its own timeout (the one passed to
    correct_video, not the client's), one retry, then the labels stay. Events, not wall time: the
    call returns while the server still holds both requests, so only the client's timeout can
    have ended them."""
    server.hold = True
    frames, labels = make_video()
    caplog.set_level(logging.INFO, logger="vss.vlm")
    with pytest.warns(RuntimeWarning, match="Timeout"):
        new, report = run(client, timeout=0.3, retries=1)
    assert server.answered == 0  # returned with nothing answered: both attempts timed out
    np.testing.assert_array_equal(new, labels)
    assert report["water"]["status"] == "failed"
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries == ["VLM request failed (APITimeoutError); retry 1/1 in 0.0 s"]  # 2 attempts
    with server.arrived:  # the server thread may read the requests after the client gave up
        assert server.arrived.wait_for(lambda: len(server.requests) == 2, timeout=120)
    assert [r["read_timeout"] for r in server.requests] == ["0.3", "0.3"]  # per request, as passed


@pytest.mark.parametrize(
    "key, echoed",
    [
        (KEY, KEY),
        ("local-token-SECRET0123", "local-token-SECRET0123"),
        (KEY, "sk-test-SECR************cdef"),
    ],
)
def test_api_key_never_logged(server, key, echoed, caplog):
    """The server echoes the key, whole or partly masked as OpenAI does, in its 401 error:
    warnings and logs hide it."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key=key)
    server.status = 401
    server.error_message = f"Incorrect API key provided: {echoed}. You can find your API key at ..."
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new, report = run(client, retries=3)
    assert report["water"]["status"] == "failed" and len(server.requests) == 1  # 4xx: no retry
    assert server.requests[0]["auth"] == f"Bearer {key}"  # the key did go to the server
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert any("AuthenticationError" in t and "Incorrect API key" in t for t in texts)
    assert not any(key in t or "SECR" in t for t in texts)


def test_no_group_class_present_sends_nothing(server, client):
    frames, labels = make_video()
    labels[np.isin(labels, [RIVER, LAKE])] = SKY
    new, report = correct_video(
        frames,
        labels,
        NAMES,
        load_groups(class_names=NAMES),
        client,
        model="m",
        video_name="v",
        retries=0,
        backoff=0.0,
    )
    assert report == {} and len(server.requests) == 0
    np.testing.assert_array_equal(new, labels)
    # a region below min_pixels is left alone without a request
    _, report = run(client, min_pixels=10**6)
    assert report["water"]["status"] == "too_small" and len(server.requests) == 0


def test_parse_answer_rule():
    classes = ("river", "lake", "sea")
    assert parse_answer("The water in the image is a lake.", classes) == "lake"
    assert parse_answer("SEA", classes) == "sea"
    assert parse_answer("Those are rivers", classes) == "river"
    assert (
        parse_answer(
            "The water in the image appears to be a river, as it is flowing and there is a visible "
            "waterfall, which is a common feature in rivers.",
            classes,
        )
        == "river"
    )
    assert parse_answer("a seashore", classes) is None  # whole words only
    assert parse_answer("not a river but a lake", classes) is None  # two classes: no change
    assert parse_answer("", classes) is None
    assert parse_answer("It is a boat.", ("ship_or_boat", "raft")) == "ship_or_boat"
    assert parse_answer("several ferries", ("ferry", "raft")) == "ferry"
    assert parse_answer("a Playground slide", ("Playground_slide", "stair")) == "Playground_slide"


def test_prompt_and_groups(tmp_path):
    (group,) = load_groups(class_names=NAMES)
    assert group == AmbiguityGroup("water", "water", ("river", "lake", "sea"))
    assert format_prompt(group) == PROMPT
    two = AmbiguityGroup("boats", "vehicle", ("ship_or_boat", "raft"))
    assert format_prompt(two) == "Is the vehicle in the image a ship/boat or raft? Please give me the only answer."
    camvid = ["sky", "building", "road", "pavement"]
    with pytest.raises(ValueError, match="vlm_groups.json.*'river'.*not a class"):
        load_groups(class_names=camvid)
    bad = tmp_path / "g.json"
    bad.write_text(json.dumps([{"name": "x", "stuff": "x", "classes": ["sky"]}]))
    with pytest.raises(ValueError, match="g.json"):
        load_groups(bad)
    bad.write_text(
        json.dumps(
            [
                {"name": "a", "stuff": "a", "classes": ["sky", "road"]},
                {"name": "b", "stuff": "b", "classes": ["road", "pavement"]},
            ]
        )
    )
    with pytest.raises(ValueError, match="'road' is in groups"):
        load_groups(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_groups(tmp_path / "nope.json")


def test_make_client(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    c = make_client("http://127.0.0.1:9/v1", timeout=3.0)
    assert c.api_key == KEY and c.max_retries == 0 and str(c.base_url).startswith("http://127.0.0.1:9/v1")
    assert make_client("http://127.0.0.1:9/v1", api_key="other").api_key == "other"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert make_client("http://127.0.0.1:9/v1").api_key == "EMPTY"  # local servers need no key
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        make_client()

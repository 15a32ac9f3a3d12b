"""The search page (`crosstvr serve`): the service behind it, its HTTP surface, and the page in a real browser."""

import os
import shutil
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from crosstvr.default_model import build_tiny_model, load_default_model
from crosstvr.indexing import VideoIndex
from crosstvr.serve import LibraryError, LibraryService
from crosstvr.synthetic import write_sample_library


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOT = os.path.join(ROOT, "docs", "search_page.png")


@pytest.fixture(scope="module")
def default_model():
    return load_default_model()


@pytest.fixture(scope="module")
def built(tmp_path_factory, default_model):
    """Eight sample videos (two groups of near duplicates) indexed with the embedded default:
    (library, index, captions)."""
    root = tmp_path_factory.mktemp("served")
    captions = write_sample_library(root / "library", count=8, seed=1)
    VideoIndex.build(root / "library", root / "index", *default_model, num_workers=0)
    return root / "library", root / "index", captions


@pytest.fixture(scope="module")
def service(built, default_model):
    library, index, _ = built
    return LibraryService(index, model=default_model[0], processor=default_model[1])


def test_search_shows_both_orders_and_reranking_moves_only_the_top_k(service):
    comparison = service.search("big red circle goes left", k=8, top_k=3)
    stage1 = service.index.search("big red circle goes left", k=8, rerank=False)
    assert [h.path for h in comparison.stage1.hits] == [h.path for h in stage1.hits]
    final = [h.path for h in comparison.final.hits]
    assert sorted(final[:3]) == sorted(h.path for h in stage1.hits[:3])
    assert final[3:] == [h.path for h in stage1.hits[3:]]
    assert all(h.fine_score is not None for h in comparison.final.hits[:3])
    assert all(h.fine_score is None for h in comparison.final.hits[3:] + comparison.stage1.hits)
    off = service.search("big red circle goes left", k=8, rerank=False)
    assert not off.reranked and [h.path for h in off.final.hits] == [h.path for h in stage1.hits]


@pytest.mark.parametrize(
    "request_kwargs, words",
    [
        ({"query": "  "}, "Type a query"),
        ({"query": "a dot", "k": 0}, "k = 0"),
        ({"query": "a dot", "top_k": 0}, "K = 0"),
        ({"query": "a dot", "top_k": 9}, "between 1 and the library's 8 videos"),
    ],
)
def test_bad_requests_get_a_message_and_the_service_keeps_answering(service, request_kwargs, words):
    with pytest.raises(LibraryError, match=words):
        service.search(**request_kwargs)
    assert len(service.search("a dot", k=2).final.hits) == 2


def test_only_indexed_videos_of_the_library_are_resolved(service, built, tmp_path):
    library, index, _ = built
    video = str(library / "000.mp4")
    assert service.resolve(os.path.abspath(video)) == os.path.abspath(video)
    outside = tmp_path / "outside.mp4"
    shutil.copy(video, outside)
    link = library / "link.mp4"  # a link inside the library to a file outside it
    os.symlink(outside, link)
    try:
        for path in ("/etc/passwd", str(outside), str(link), f"{library}/../index/catalog.sqlite",
                     str(index / "catalog.sqlite")):
            with pytest.raises(LibraryError, match="Only indexed videos"):
                service.resolve(path)
            with pytest.raises(LibraryError):
                service.thumbnail(path)
    finally:
        os.remove(link)


def test_thumbnail_is_a_grid_of_frames(service, built):
    library, _, _ = built
    import numpy as np
    from PIL import Image

    path = service.thumbnail(os.path.abspath(library / "001.mp4"))
    thumbnail = np.asarray(Image.open(path).convert("RGB"))
    assert thumbnail.shape == (160, 160, 3) and thumbnail.std() > 0
    assert service.thumbnail(os.path.abspath(library / "001.mp4")) == path  # written once


def test_a_missing_index_is_reported_then_built_from_the_page(built, default_model, tmp_path):
    library, _, _ = built
    service = LibraryService(tmp_path / "new-index", library, model=default_model[0], processor=default_model[1])
    assert "no video index" in service.status() and "Index the library" in service.status()
    with pytest.raises(LibraryError, match="no video index"):
        service.search("a dot")
    progress = []
    summary = service.add_videos(on_progress=lambda done, total: progress.append((done, total)))
    assert "8 added" in summary and progress[-1] == (8, 8)
    assert "8 videos indexed" in service.status()
    assert len(service.search("a dot", k=3).final.hits) == 3


def test_an_index_built_by_another_model_is_refused_with_the_reason(built):
    _, index, _ = built
    service = LibraryService(index, model=build_tiny_model()[0], processor=build_tiny_model()[1])
    assert "another model" in service.status()
    with pytest.raises(LibraryError, match="another model"):
        service.search("a dot")
    with pytest.raises(LibraryError, match="another model"):
        service.add_videos()


def test_adding_videos_runs_beside_searches(built, default_model, tmp_path):
    library, _, _ = built
    shutil.copytree(library, tmp_path / "library")
    for name in ("006.mp4", "007.mp4"):
        os.remove(tmp_path / "library" / name)
    VideoIndex.build(tmp_path / "library", tmp_path / "index", *default_model, num_workers=0)
    service = LibraryService(tmp_path / "index", model=default_model[0], processor=default_model[1])
    for name in ("006.mp4", "007.mp4"):
        shutil.copy(library / name, tmp_path / "library" / name)
    progress, results = [], {}
    adding = threading.Thread(target=lambda: results.setdefault("summary", service.add_videos(
        on_progress=lambda done, total: progress.append((done, total)))))
    adding.start()
    answered = 0
    while adding.is_alive() or not answered:
        assert service.search("a dot", k=3).final.hits
        answered += 1
    adding.join()
    assert "2 added" in results["summary"] and progress[-1] == (2, 2)
    assert len(service.index) == 8 and "8 videos indexed" in service.status()
    with pytest.raises(LibraryError, match="between 1 and 100"):
        service.search("a dot", k=101)


# ----------------------------------------------------------------------------------------------------------------------
# The page over HTTP and in a browser
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(service):
    pytest.importorskip("gradio", reason='the search page needs Gradio: pip install -e ".[app]"')
    from crosstvr.serve import serve

    app, url = serve(service, port=None, block=False)
    yield url
    app.close()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except urllib.error.URLError:  # nothing listening yet
        return 0


def test_files_outside_the_library_are_refused(server, built):
    library, index, _ = built
    assert _status(f"{server}gradio_api/file={library}/000.mp4") == 200
    for path in ("/etc/passwd", f"{index}/catalog.sqlite", f"{library}/../index/catalog.sqlite", f"{library}/%2e%2e/x"):
        assert _status(f"{server}gradio_api/file={path}") in (403, 404), path


def test_twenty_concurrent_queries_get_twenty_answers(server, built):
    from gradio_client import Client

    _, _, captions = built
    client = Client(server, verbose=False)
    queries = [list(captions.values())[i % len(captions)] for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda q: client.predict(q, 3, 3, True, api_name="/search"), queries))
    assert len(answers) == 20
    for query, (final, stage1, table, message, *_) in zip(queries, answers):
        assert len(final) == 3 and len(stage1) == 3 and query in message and "<table" in table


def _chromium() -> tuple[str, str]:
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("browser tests need Chromium and its driver: apt-get install chromium chromium-driver")
    return browser, driver


@pytest.fixture
def browser():
    selenium = pytest.importorskip("selenium", reason='the browser tests need Selenium: pip install -e ".[dev]"')
    del selenium
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_the_page_answers_a_query_in_a_browser(server, built, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    _, _, captions = built
    expected, query = next(iter(captions.items()))
    browser.get(server)
    wait = WebDriverWait(browser, 60)
    box = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#query textarea, #query input"))
    assert "8 videos indexed" in browser.find_element(By.ID, "status").text
    box.send_keys(query, Keys.ENTER)
    rows = wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#results-table tbody tr"))
    top = [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows]
    assert len(top) == 8 and expected in top[:4]
    for gallery in ("final", "stage1"):  # both orders are shown, one thumbnail per result
        assert len(browser.find_elements(By.CSS_SELECTOR, f"#{gallery} img")) == 8
    assert "re-ranked by stage 2" in browser.find_element(By.ID, "message").text
    browser.find_elements(By.CSS_SELECTOR, "#final img")[0].click()
    wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#player video"))
    assert top[0] in browser.find_element(By.ID, "playing").text
    browser.execute_script("window.scrollTo(0, 0)")
    shot = SCREENSHOT if os.environ.get("CROSSTVR_UPDATE_SCREENSHOT") else str(tmp_path / "page.png")
    assert browser.save_screenshot(shot) and os.path.getsize(shot) > 10_000


def test_the_page_shows_a_bad_request_and_keeps_serving(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, 60)
    box = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#query textarea, #query input"))
    box.send_keys(Keys.ENTER)  # an empty query
    wait.until(lambda page: "Type a query" in page.find_element(By.ID, "message").text)
    box.send_keys("small green triangle goes up", Keys.ENTER)
    wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#results-table tbody tr"))


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_page(process, url: str, timeout: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        if _status(url) == 200:
            return
        time.sleep(0.5)
    raise TimeoutError(f"nothing answered on {url}")


def _run_server(command: list[str], env: dict, cwd: str):
    import subprocess

    return subprocess.Popen(command, env={**os.environ, **env}, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_cli_serves_a_missing_index_with_the_reason_on_the_page(built, tmp_path):
    pytest.importorskip("gradio")
    import json
    import sys

    library, _, _ = built
    port = _free_port()
    process = _run_server([sys.executable, "-m", "crosstvr", "serve", str(tmp_path / "none"), "--library", str(library),
                           "--port", str(port)], {}, str(tmp_path))
    try:
        _wait_for_page(process, f"http://127.0.0.1:{port}/")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config") as response:
            config = json.dumps(json.load(response))
        assert "There is no video index" in config and "Index the library" in config
    finally:
        process.terminate()
        process.wait(30)


def test_app_py_serves_the_samples_on_the_embedded_default(tmp_path):
    pytest.importorskip("gradio")
    import sys

    from gradio_client import Client

    port = _free_port()
    process = _run_server([sys.executable, os.path.join(ROOT, "app.py")],
                          {"CROSSTVR_APP_DIR": str(tmp_path / "app"), "GRADIO_SERVER_PORT": str(port)}, str(tmp_path))
    try:
        _wait_for_page(process, f"http://127.0.0.1:{port}/")
        final, stage1, table, message = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            "big red circle goes left", 5, 5, True, api_name="/search")
        assert len(final) == len(stage1) == 5 and "re-ranked by stage 2" in message
        assert len(os.listdir(tmp_path / "app" / "videos")) == 24
    finally:
        process.terminate()
        process.wait(30)


def test_a_damaged_index_gets_a_message_not_a_crash(built, default_model, tmp_path):
    _, index, _ = built
    shutil.copytree(index, tmp_path / "index")
    service = LibraryService(tmp_path / "index", model=default_model[0], processor=default_model[1])
    for name in os.listdir(tmp_path / "index" / "chunks"):
        if name.endswith(".safetensors"):
            os.remove(tmp_path / "index" / "chunks" / name)
    with pytest.raises(LibraryError, match="rebuild the index"):
        service.search("a dot", k=3, top_k=3)


def test_serve_binds_loopback_unless_told_and_warns_when_not(service, monkeypatch, caplog):
    gradio = pytest.importorskip("gradio")
    from crosstvr.serve import serve

    launches = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launches.append(kwargs) or (None, "url", None))
    serve(service, block=False)
    assert launches[-1]["server_name"] == "127.0.0.1" and not caplog.records
    assert launches[-1]["allowed_paths"] == [service.library_dir]
    assert launches[-1]["blocked_paths"] == [service.index_dir]
    serve(service, host="0.0.0.0", block=False)
    assert launches[-1]["server_name"] == "0.0.0.0"
    assert "anyone who can reach this machine" in caplog.text

"""`xtune webui`: a FastAPI app (the API below) and one small page (static/) that calls it.

Every route but /static needs the token printed at start (header `X-Xtune-Token`, or `?token=` where a browser
cannot set headers: the page's URL, an <img>), on loopback too: another user of a shared machine can reach a loopback
port, and the token is the key to running code as you (Python configs). The printed URL carries it, and the page
keeps it. On a loopback bind the UI answers only under a loopback host name, so that another site cannot reach it by
DNS rebinding; no other site may frame it either.
"""

import json
import secrets
import tempfile
from pathlib import Path

from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from xtune.errors import XtuneError
from xtune.infer.serve import is_loopback
from xtune.webui.files import OutsideRoots, Roots
from xtune.webui.forms import FormError, config_text, load_form, parse_form, schema_fields, validate, write_config
from xtune.webui.runs import Runs, plot_svg, read_metrics

STATIC = Path(__file__).parent / "static"
TOKEN_HEADER = "X-Xtune-Token"
MAX_UPLOAD_BYTES = 32 << 20
NO_FRAMES = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}
"""On every answer: a page of another site cannot show this one in a frame and click its buttons for you."""


def check_bind(host: str, token: str | None) -> None:
    """A bind beyond loopback serves anyone who can reach the port: it needs a token."""
    if not is_loopback(host) and not token:
        raise XtuneError(f"--host {host} is reachable from other machines: it needs a token (--token, or leave it out "
                         "to get a random one printed); refusing to start without one.")  # fmt: skip


def _host_name(request: Request) -> str:
    host = request.headers.get("host", "")
    return host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"


def create_app(roots: Roots, token: str | None = None, loopback: bool = True, device: str = "auto") -> FastAPI:
    from xtune.webui.chat import Chats, chat_models, options_from, template_of
    from xtune.webui.export import Exports, available, eval_results

    token = token or secrets.token_urlsafe(24)
    if not loopback:
        check_bind("0.0.0.0", token)
    app = FastAPI(title="xtune webui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.token, app.state.roots = token, roots
    runs, chats, exports = Runs(roots), Chats(device), Exports(roots)
    app.state.runs = runs

    @app.middleware("http")
    async def guard(request: Request, call_next):
        given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token")
        authorized = given is not None and secrets.compare_digest(given.encode(), token.encode())
        if loopback and not is_loopback(_host_name(request)):
            answer = JSONResponse({"error": "this web UI answers only to a loopback host name"}, status_code=403)
        elif not authorized and not request.url.path.startswith("/static/"):  # the page's code and style: no secret
            answer = JSONResponse({"error": f"missing or wrong token ({TOKEN_HEADER} header, or ?token= as the URL "
                                            "printed at start has it)"}, status_code=401)  # fmt: skip
        else:
            answer = await call_next(request)
        answer.headers.update(NO_FRAMES)
        return answer

    @app.exception_handler(XtuneError)
    async def xtune_error(request: Request, error: XtuneError):
        if isinstance(error, FormError):
            return JSONResponse({"error": str(error), "errors": error.errors}, status_code=422)
        return JSONResponse({"error": str(error)}, status_code=403 if isinstance(error, OutsideRoots) else 400)

    @app.get("/", response_class=HTMLResponse)
    def page():
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return html.replace('"{{TOKEN}}"', json.dumps(token).replace("<", "\\u003c"))  # a JS string, whatever it holds

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # configure ---------------------------------------------------------------------------------

    @app.get("/api/configs")
    def configs(pattern: str | None = None):
        from xtune.config.load import list_configs

        return {"builtin": list_configs(pattern)}

    @app.get("/api/schema")
    def schema():
        return {"fields": [field.__dict__ for field in schema_fields()]}

    @app.post("/api/config/load")
    def config_load(body: dict = Body(...)):
        name = str(_need(body, "config"))
        if _looks_like_path(name):
            name = str(roots.inside(name))
        return load_form(name, allow_code=bool(body.get("allow_code")))

    @app.post("/api/config/validate")
    def config_validate(body: dict = Body(...)):
        return {"errors": validate(_need(body, "values"), bool(body.get("allow_code")))}

    def saved_config(body: dict) -> Path:
        name = Path(str(body.get("name") or "webui_config")).name.removesuffix(".yaml")
        path = roots.inside(Path("configs") / f"{name}.yaml")
        return write_config(parse_form(_need(body, "values")), path, bool(body.get("allow_code")))

    @app.post("/api/config/save")
    def config_save(body: dict = Body(...)):
        path = saved_config(body)
        return {"path": roots.shown(path), "command": runs_command(path, body), "text": path.read_text()}

    def runs_command(path: Path, body: dict) -> str:
        from xtune.webui.runs import shown_command

        return shown_command(runs.train_command(roots.shown(path), allow_code=bool(body.get("allow_code"))))

    @app.post("/api/config/preview")
    def config_preview(body: dict = Body(...)):
        return {"text": config_text(parse_form(_need(body, "values")))}

    def loaded(body: dict):
        from xtune.config.load import load_config

        with tempfile.TemporaryDirectory() as folder:
            values = parse_form(_need(body, "values"))
            path = write_config(values, Path(folder) / "config.yaml", bool(body.get("allow_code")))
            config, _ = load_config(str(path), allow_code=bool(body.get("allow_code")))
        roots.check_reads(config)
        return config

    @app.post("/api/dataset/check")
    def dataset_check(body: dict = Body(...)):
        from dataclasses import asdict

        from xtune.data.inspect import check_dataset

        check = check_dataset(loaded(body))
        return {**asdict(check), "ok": check.ok, "trained_ratio": check.trained_ratio,
                "bad_records": [str(bad) for bad in check.bad_records]}  # fmt: skip

    @app.post("/api/dataset/samples")
    def dataset_samples(body: dict = Body(...)):
        from xtune.data.inspect import first_samples

        samples = first_samples(loaded(body), int(body.get("n", 3)))
        return {"samples": [{"location": s.location, "tokens": len(s.sample.input_ids), "trained": s.sample.num_trained,
                             "truncated": s.sample.truncated, "runs": s.runs} for s in samples]}  # fmt: skip

    # train and watch ---------------------------------------------------------------------------

    @app.post("/api/train")
    def train(body: dict = Body(...)):
        loaded(body)  # the data it names lie inside the roots
        path = saved_config(body)
        config = parse_form(body["values"])
        work_dir = roots.inside(config.get("work_dir") or Path("work_dirs") / path.stem)
        job = runs.start(path, work_dir, allow_code=bool(body.get("allow_code")))
        return {"job": job.id, "pid": job.pid, "command": runs_command(path, body), "config": roots.shown(path)}

    @app.get("/api/runs")
    def list_runs():
        return runs.summaries()

    @app.get("/api/run")
    def run_detail(run: str):
        return runs.detail(run)

    @app.post("/api/run/stop")
    def run_stop(body: dict = Body(...)):
        return {"stopped": runs.stop(str(_need(body, "run")))}

    @app.post("/api/run/resume")
    def run_resume(body: dict = Body(...)):
        job = runs.resume(str(_need(body, "run")))
        from xtune.webui.runs import shown_command

        return {"job": job.id, "pid": job.pid, "command": shown_command(job.command)}

    @app.get("/api/plot.svg")
    def plot(run: list[str] = Query(...), metric: str = "loss"):
        from xtune.webui.runs import CURVES, curves

        if metric not in CURVES:
            raise XtuneError(f"metric {metric!r}: one of {', '.join(CURVES)}.")
        series = {runs.roots.shown(runs.run_dir(r)): curves(read_metrics(runs.run_dir(r)))[metric] for r in run}
        return Response(plot_svg(series, metric), media_type="image/svg+xml")

    # files -------------------------------------------------------------------------------------

    @app.get("/api/files")
    def files(path: str = ""):
        return roots.listing(path)

    # chat --------------------------------------------------------------------------------------

    @app.get("/api/chat/info")
    def chat_info(checkpoint: str):
        folder = roots.inside(checkpoint)
        model, base = chat_models(folder)
        return {"model": _shown(roots, model.label), "base": _shown(roots, base.label) if base else None,
                "template": template_of(folder),
                "llava": model.llava is not None}  # fmt: skip

    @app.get("/api/templates")
    def templates():
        from xtune.data.templates import SYSTEM_TEMPLATES, TEMPLATES

        return {"templates": [*TEMPLATES, "hf"], "system_templates": SYSTEM_TEMPLATES}

    @app.post("/api/chat")
    def chat(body: dict = Body(...)):
        """NDJSON lines: {"delta": text} as the reply is written, then {"reply": text} (or {"error": text})."""
        options = options_from(body)
        folder = roots.inside(str(_need(body, "checkpoint")))
        model, base = chat_models(folder)
        which = base if body.get("side") == "base" else model
        if which is None:
            raise XtuneError("no base model to compare with for this checkpoint.")
        image = roots.inside(body["image"]) if body.get("image") else None
        keep = {model, *([base] if base else [])}
        pieces = chats.stream(which, keep, _need(body, "messages"), body.get("system", ""), body.get("template"),
                              str(image) if image else None, options)  # fmt: skip

        def lines():
            try:
                for kind, text in pieces:
                    yield json.dumps({kind: text}) + "\n"
            except Exception as error:  # the stream has begun: the error goes into it
                yield json.dumps({"error": str(error)}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/api/upload")
    async def upload(request: Request, name: str):
        """An image for a LLaVA chat, saved under uploads/ in the first root."""
        if Path(name).name in ("", ".", ".."):
            raise XtuneError(f"upload?name={name!r}: name the image file (e.g. upload?name=photo.png).")
        folder = roots.inside("uploads")
        folder.mkdir(exist_ok=True)
        path = roots.inside(folder / Path(name).name)
        data = await request.body()
        if len(data) > MAX_UPLOAD_BYTES:
            raise XtuneError(f"the image is {len(data):,} bytes; at most {MAX_UPLOAD_BYTES:,} are taken.")
        path.write_bytes(data)
        return {"path": roots.shown(path)}

    # export ------------------------------------------------------------------------------------

    @app.get("/api/exports")
    def list_exports():
        return {"available": available(), "jobs": exports.view(), "eval": eval_results(roots)}

    @app.post("/api/export")
    def start_export(body: dict = Body(...)):
        kind, source, output = (str(_need(body, key)) for key in ("kind", "source", "output"))
        return exports.start(kind, source, output, body.get("options")).view()

    return app


def _need(body: dict, key: str):
    if body.get(key) in (None, ""):
        raise XtuneError(f"the request's JSON needs {key!r}.")
    return body[key]


def _shown(roots: Roots, name: str) -> str:
    return roots.shown(Path(name)) if Path(name).is_absolute() else name


def _looks_like_path(name: str) -> bool:
    return "/" in name or name.endswith((".py", ".yaml", ".yml", ".json"))


def run_webui(host: str, port: int, roots: list[Path], token: str | None, device: str = "auto", console=None) -> None:
    import os

    import uvicorn

    loopback = is_loopback(host)
    if token is not None:
        check_bind(host, token)
    token = token or secrets.token_urlsafe(24)
    folders = Roots.of(roots or [Path.cwd()])
    os.chdir(folders.main)  # relative paths in configs resolve as they do for `xtune train` run from there
    app = create_app(folders, token, loopback, device)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}/?token={token}"
    if console is not None:
        console.print(f"xtune webui on {url}", highlight=False)
        console.print(f"token: {token} (required)", highlight=False)
        console.print(f"folders served: {', '.join(map(str, folders.folders))}", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning")

"""Azure Functions (Python v2 model): triggers and wiring only. Logic lives in byok_pipeline."""

# No `from __future__ import annotations`: the worker reads the binding types from the
# annotations (the blob trigger's SDK type), so they stay real objects.

import azure.functions as func
import azurefunctions.extensions.bindings.blob as blob_types

from byok_pipeline.processing import runtime

runtime.configure_logging()
app = func.FunctionApp()


@app.function_name("process_package")
@app.blob_trigger(
    arg_name="blob",
    path="%BYOK_INCOMING_CONTAINER%/{name}",
    connection="BYOK_STORAGE",
    source=func.BlobSource.EVENT_GRID,
)
def process_package(blob: blob_types.BlobClient) -> None:
    """A package was dropped. The binding is a BlobClient (SDK type), so the host downloads
    nothing: the pipeline reads the blob itself, size cap first. Transient failures raise, so
    the platform redelivers."""
    runtime.handle_blob(blob.blob_name)


@app.function_name("process_approval")
@app.blob_trigger(
    arg_name="blob",
    path="%BYOK_APPROVALS_CONTAINER%/{name}",
    connection="BYOK_STORAGE",
    source=func.BlobSource.EVENT_GRID,
)
def process_approval(blob: blob_types.BlobClient) -> None:
    """An approval (or a manifest) arrived for a package: a package awaiting approval is
    delivered again. Transient failures raise, so the platform redelivers."""
    runtime.handle_approval(blob.blob_name)


@app.function_name("reconcile")
@app.timer_trigger(arg_name="timer", schedule="%BYOK_RECONCILE_SCHEDULE%", run_on_startup=False)
def reconcile(timer: func.TimerRequest) -> None:  # noqa: ARG001  # the binding requires it
    """Complete missing audit records and redeliver packages whose events were lost."""
    runtime.reconcile()


def _response(result: tuple[int, bytes]) -> func.HttpResponse:
    status, body = result
    return func.HttpResponse(body, status_code=status, mimetype="application/json")


@app.function_name("list_packages")
@app.route(route="packages", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def list_packages(req: func.HttpRequest) -> func.HttpResponse:
    return _response(runtime.list_packages(req.params.get("state")))


@app.function_name("get_package")
@app.route(route="packages/{name}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def get_package(req: func.HttpRequest) -> func.HttpResponse:
    return _response(runtime.get_package(req.route_params.get("name", "")))


@app.function_name("get_kek")
@app.route(route="kek", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def get_kek(req: func.HttpRequest) -> func.HttpResponse:  # noqa: ARG001  # the binding requires the parameter
    return _response(runtime.get_kek())


@app.function_name("dashboard")
@app.route(route="dashboard", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def dashboard(req: func.HttpRequest) -> func.HttpResponse:  # noqa: ARG001  # the binding requires the parameter
    """The HTML dashboard (the same page as ``byok serve``), with its security headers."""
    status, body, headers = runtime.dashboard()
    return func.HttpResponse(body, status_code=status, headers=headers)

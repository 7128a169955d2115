"""Worker classes as users define them in their own modules: subclasses of both UvicornWorkers
that change uvicorn's settings (uvicorn-gunicorn-docker and many apps ship one like these)."""

import warnings

from uvicorn_worker import UvicornWorker

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # uvicorn.workers says it is deprecated
    from uvicorn.workers import UvicornWorker as LegacyUvicornWorker


class AppWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "asyncio", "http": "h11"}


class LegacyAppWorker(LegacyUvicornWorker):
    CONFIG_KWARGS = {"loop": "asyncio", "http": "h11"}

"""``cadence serve``: generation behind an HTTP API (FastAPI) and a web page.

- ``app.py``      the routes: OpenAI-style ``/v1/videos``, ``/v1/images/generations``,
                  ``/v1/models``, ``/v1/recipes``, progress as server-sent events, ``/metrics``
- ``requests.py`` what a request may ask, checked before it is queued (422 names the bad value)
- ``worker.py``   one thread per device slot, a loaded pipeline per model, the bounded queue,
                  per-request time limit and cancellation at the next denoising step
- ``jobs.py``     job records as JSON files written atomically: a restart keeps them
- ``catalog.py``  the recipes each model can be asked for, with what the tree measured of them
- ``static/``     the page: plain HTML and JavaScript, no build step
"""

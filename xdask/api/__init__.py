"""Every request and response schema of xdask, in one package (no Tornado, no Dask here).

==================  =========================================================================
module              what it holds
==================  =========================================================================
``base``            the pydantic configs every schema uses, ``validation_error`` (the 400)
``chat``            chat and completion requests, their answers, stream chunks, ``fold_stream``
``embeddings``      embedding and rerank requests and answers
``media``           image and audio requests (JSON bodies and multipart forms)
``models``          launch and registration requests, the description of a running model
``batch``           the Batch API's create request
``wire``            the messages between a model replica and its callers on a Dask comm
==================  =========================================================================

The HTTP server, the Batch API, the Python client, the CLI and the Jupyter
launcher all validate and build with these, so a request or an answer has one
shape wherever it is read. Errors are ``xdask.errors``.
"""

"""The HTTP server: the Starlette app, its guards and its routes, over the engine."""

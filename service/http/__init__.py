"""The HTTP room: the app, its routes (public and admin), the body and protocol layers,
middleware, deadlines, responses, the OpenAPI schemas and docs, admin tokens and the server.
Only this room imports FastAPI, Starlette or uvicorn; it translates HTTP to calls and back."""

"""The programs (vision, prefill, decode) the compiler traces, and their tracing."""

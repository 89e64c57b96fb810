"""Ray actors: each owns a process and its resources; the math lives in the library."""

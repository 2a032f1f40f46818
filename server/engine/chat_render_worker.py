"""One chat-template render worker process: `python -m server.engine.chat_render_worker MEMORY_BYTES`.

A task's chat template is code its uploader wrote: rendering it can loop for minutes or build a
gigabyte string. The server therefore never renders in its own process; `server.engine.chat_render`
keeps a few of these workers and kills one that overruns its deadline (a thread cannot be killed).
Here the worker caps its own address space (`RLIMIT_AS`: MEMORY_BYTES above what it uses once warm),
so a template that allocates too much gets a `MemoryError` instead of taking the machine's memory,
and runs at a lower CPU priority than the server, so a long render slows the engine as little as the
scheduler allows.

Rendering is transformers' own `render_jinja_template` (what `apply_chat_template(tokenize=False)`
calls: the sandboxed Jinja environment, `raise_exception`, `tojson`, `{% generation %}`), so a
template renders here exactly as in transformers and vLLM. Only transformers' chat-template module is
imported: no torch, no tokenizer.

The frame protocol, the memory cap and the priority are `server.engine.worker_pool.run_worker`'s;
the answers are `_answer`'s.
"""

from __future__ import annotations

from typing import Any

from server.engine.worker_pool import run_worker


def _render(request: dict[str, Any]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    # Annotated `-> str` but returns (rendered conversations, generation indices).
    result: Any = render_jinja_template(
        conversations=[request["messages"]],
        chat_template=request["template"],
        add_generation_prompt=request["add_generation_prompt"],
        continue_final_message=request["continue_final_message"],
        **request["variables"],
    )
    return str(result[0][0])


def _check(template: str, max_iterations: int) -> None:
    """What can be decided before any render: the template compiles (syntax, tags), and loops over
    literal `range(...)`s do not nest to more than `max_iterations` iterations."""
    import jinja2.nodes
    from transformers.utils.chat_template_utils import _compile_jinja_template

    environment = _compile_jinja_template(template).environment

    def literal_range(node: jinja2.nodes.Node) -> int | None:
        if not (isinstance(node, jinja2.nodes.Call) and isinstance(node.node, jinja2.nodes.Name)):
            return None
        if node.node.name != "range" or node.kwargs or node.dyn_args or node.dyn_kwargs:
            return None
        if not all(isinstance(a, jinja2.nodes.Const) and isinstance(a.value, int) for a in node.args):
            return None
        try:
            return len(range(*(a.value for a in node.args)))  # type: ignore[attr-defined]
        except (TypeError, ValueError, OverflowError):
            return None

    def visit(node: jinja2.nodes.Node, iterations: int) -> None:
        if isinstance(node, jinja2.nodes.For):
            size = literal_range(node.iter)
            if size is not None:
                iterations *= max(size, 1)
                if iterations > max_iterations:
                    raise ValueError(
                        f"loops over literal ranges run {iterations} times; at most {max_iterations}"
                    )
        for child in node.iter_child_nodes():
            visit(child, iterations)

    visit(environment.parse(template), 1)


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    """`{"text"}`, `{"ok": true}` for a check, or `{"error", "reason"}` with reason "template"
    (the template failed on these inputs), "memory" (it needed more than the cap) or "output" (its
    text is longer than `max_chars`)."""
    try:
        if request.get("check"):
            _check(request["template"], int(request["max_iterations"]))
            return {"ok": True}
        text = _render(request)
    except MemoryError:
        return {"error": "rendering needed more memory than a chat template may use", "reason": "memory"}
    except RecursionError:
        return {"error": "the chat template recursed too deeply", "reason": "template"}
    except Exception as exc:  # jinja's TemplateError, raise_exception(), bad variables
        return {"error": f"{type(exc).__name__}: {exc}"[:2000], "reason": "template"}
    max_chars = int(request["max_chars"])
    if len(text) > max_chars:
        return {
            "error": f"the rendered prompt has {len(text)} characters; at most {max_chars} fit the model",
            "reason": "output",
        }
    return {"text": text}


def _warm(init: dict[str, Any] | None) -> None:
    _answer(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "template": "{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}",
            "add_generation_prompt": False,
            "continue_final_message": False,
            "variables": {},
            "max_chars": 100,
        }
    )


def main() -> None:
    run_worker(_answer, _warm)


if __name__ == "__main__":
    main()

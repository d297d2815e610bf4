"""A client update written as steps, so that backends can run clients back to back.

``Algorithm.client_update`` is a function of ONE client's whole local data. When it is a
:class:`LocalUpdate`, a backend also sees its pieces: the carry a client starts from, one local
step, and how a finished carry becomes the client's message. That is what lets a backend run
several clients one after another in the same client slot ("packing", DESIGN.md "Data for
vmap"): at a client boundary the slot's carry is reset to :attr:`LocalUpdate.start`, and the
carry left after the client's last step is what :attr:`LocalUpdate.finish` turns into the
client's output. Heavy-tailed populations then cost their real steps, not ``clients x
largest client``.

Calling a :class:`LocalUpdate` like a plain ``client_update`` runs exactly
``start -> scan(step) -> finish``, so both execution paths compute the same numbers. A backend
that wants the local loop unrolled (XLA:CPU runs convolutions ~10x slower inside while loops)
says so explicitly with :meth:`LocalUpdate.run`'s ``unroll``; :func:`call_client_update` does
that for any client update (a plain function runs its own loop and takes no hint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

from fedjax_lab.core.types import Batches, ClientOutput, PyTree, ServerState

# start(server_state) -> carry of a client that has not taken a step yet.
Start = Callable[[ServerState], PyTree]
# context(server_state, client_state) -> per-client constants the steps read (e.g. SCAFFOLD's
# c - c_i); () when the steps read none. A ``keyed`` update's context also takes the client's
# PRNG key: context(server_state, client_state, key) (randomness of the local steps, e.g.
# dropout masks, derived from it so that padded and packed execution draw the same).
Context = Callable[..., PyTree]
# step(server_state, context, carry, arrays, mask) -> carry after one local step on the batch
# ``arrays`` ({"x": [B, ...], ...}) with example mask ``mask`` [B].
Step = Callable[[ServerState, PyTree, PyTree, dict[str, jax.Array], jax.Array], PyTree]
# finish(server_state, client_state, carry, weight, *, key) -> (ClientOutput, new client state).
Finish = Callable[..., tuple[ClientOutput, PyTree]]


def no_context(server_state: ServerState, client_state: PyTree) -> PyTree:
    """The context of steps that read nothing client-specific."""
    del server_state, client_state
    return ()


@dataclass(frozen=True)
class LocalUpdate:
    """A ``client_update`` made of a start carry, a local step and a finish.

    Contract (checked by the packing tests against the plain call):
      * ``start`` depends on the server state only; everything client-specific that the steps
        need comes from ``context`` (computed once per client and round);
      * a step whose mask is all zero returns the carry unchanged (padding is a no-op);
      * ``finish`` sees the carry after the client's last step, its scalar weight (the number of
        real examples, 0 for a padded or dropped slot) and its PRNG key;
      * randomness of the steps (dropout) comes from the context of a ``keyed`` update, which
        receives the same client key as ``finish``; a step derives its own key from it and
        from the carry (e.g. ``fold_in(key, steps taken)``), never from its position in a
        padded or packed layout, so both layouts draw the same numbers.

    Attributes:
      start: ``server_state -> carry``.
      step: ``(server_state, context, carry, arrays, mask) -> carry``.
      finish: ``(server_state, client_state, carry, weight, *, key) -> (ClientOutput, state)``.
      context: ``(server_state, client_state) -> context`` (default: ``()``), or
        ``(server_state, client_state, key) -> context`` when ``keyed``.
      keyed: whether ``context`` takes the client's PRNG key (stochastic local steps).
    """

    start: Start
    step: Step
    finish: Finish
    context: Context = no_context
    keyed: bool = False

    def client_context(
        self, server_state: ServerState, client_state: PyTree, key: jax.Array
    ) -> PyTree:
        """The context of one client's steps; ``key`` is the client's key (as ``finish``'s)."""
        if self.keyed:
            return self.context(server_state, client_state, key)
        return self.context(server_state, client_state)

    def __call__(
        self, server_state: ServerState, client_state: PyTree, batches: Batches, *, key: jax.Array
    ) -> tuple[ClientOutput, PyTree]:
        """One client's update over ``[S, B]`` batches: start, scan of steps, finish."""
        return self.run(server_state, client_state, batches, key=key)

    def run(
        self, server_state: ServerState, client_state: PyTree, batches: Batches, *,
        key: jax.Array, unroll: int | bool = 1,
    ) -> tuple[ClientOutput, PyTree]:
        """As the plain call, with the local steps' ``lax.scan`` unrolled by ``unroll``.

        ``unroll`` changes the program's shape, never its numbers (``True``: no loop at all).
        """
        ctx = self.client_context(server_state, client_state, key)

        def body(carry, inputs):
            step_input, mask = inputs
            return self.step(server_state, ctx, carry, batches.step_arrays(step_input), mask), None

        carry, _ = jax.lax.scan(
            body, self.start(server_state), (batches.step_inputs(), batches.mask),
            unroll=unroll,
        )
        return self.finish(server_state, client_state, carry, batches.weight, key=key)

    def with_finish(self, wrap: Callable[[Finish], Finish]) -> LocalUpdate:
        """The same local training with ``finish`` replaced by ``wrap(finish)``.

        Wrappers that change only a client's message (FedNova's step norm, payload metrics) use
        this instead of wrapping the whole call, so that the result can still be packed.
        """
        return LocalUpdate(self.start, self.step, wrap(self.finish), self.context, self.keyed)


def is_local_update(client_update: Any) -> bool:
    """Whether a backend may run this client update step by step (pack clients)."""
    return isinstance(client_update, LocalUpdate)


def call_client_update(
    client_update: Any, server_state: ServerState, client_state: PyTree, batches: Batches, *,
    key: jax.Array, unroll: int | bool = 1,
) -> tuple[ClientOutput, PyTree]:
    """Runs one client; a :class:`LocalUpdate`'s local loop is unrolled by ``unroll``."""
    if is_local_update(client_update):
        return client_update.run(server_state, client_state, batches, key=key, unroll=unroll)
    return client_update(server_state, client_state, batches, key=key)

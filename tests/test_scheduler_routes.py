"""What the mesh is told (scheduler.service.routes): each agent its replicas, every gateway the
routes without the drained and the gone, and a watcher that already has the epoch not told again."""

from __future__ import annotations

import asyncio

from protos import agent_pb2, plan_pb2
from scheduler.service.nodes import NodeState
from scheduler.service.routes import RouteBroadcast, assignment, routes


def plan() -> plan_pb2.Plan:
    p = plan_pb2.Plan(epoch=4)
    st = p.stages.add(pipeline="p", stage="a")
    st.replicas.add(replica_id="a0", node="n1")
    st.replicas.add(replica_id="a1", node="n2")
    p.stages.add(pipeline="p", stage="b").replicas.add(replica_id="b0", node="n1")
    return p


def node(name: str, *eps: tuple[str, plan_pb2.ReplicaState.ValueType]) -> NodeState:
    endpoints = [plan_pb2.Endpoint(replica=plan_pb2.ReplicaPlan(replica_id=rid, node=name),
                                   state=state) for rid, state in eps]  # fmt: skip
    return NodeState(name, "", agent_pb2.InventoryResponse(), endpoints, 0, 0.0)


def test_an_assignment_holds_the_nodes_replicas_with_their_stage() -> None:
    out = assignment(plan(), "n1")
    assert out.epoch == 4 and out.node == "n1"
    assert [(r.stage, r.replica.replica_id) for r in out.replicas] == [("a", "a0"), ("b", "b0")]


def test_routes_leave_out_drained_nodes_drained_replicas_and_gone_replicas() -> None:
    ready = plan_pb2.REPLICA_STATE_READY
    live = [
        node("n2", ("a1", ready)),
        node("n1", ("a0", ready), ("b0", ready), ("x", plan_pb2.REPLICA_STATE_FAILED)),
        node("n3", ("c0", ready)),
    ]
    out = routes(4, live, {"n3"}, {"b0"})
    assert out.epoch == 4
    assert [ep.replica.replica_id for ep in out.endpoints] == ["a0", "a1"]


async def test_a_watcher_with_the_epoch_hears_only_the_next_change() -> None:
    b = RouteBroadcast()
    b.publish(plan_pb2.Routes(epoch=4))
    seen: list[int] = []
    heard = asyncio.Event()

    async def follow(known: int) -> None:
        async for r in b.watch(known):
            seen.append(r.epoch)
            heard.set()

    up_to_date = asyncio.create_task(follow(4))
    b.publish(plan_pb2.Routes(epoch=5))
    await asyncio.wait_for(heard.wait(), 10)
    b.close()
    await asyncio.wait_for(up_to_date, 10)
    assert seen == [5]

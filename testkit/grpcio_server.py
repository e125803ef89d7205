"""A gRPC C-core server (Python grpcio, asyncio) for tower-sd's conformance tests.

It serves the standard `grpc.health.v1.Health` service (grpcio-health-checking), with the
server options given as a JSON object on the command line (`grpc.max_connection_age_ms`,
`grpc.http2.min_ping_interval_without_data_ms`, `grpc.max_concurrent_streams`, ...), so each
test runs C-core's own HTTP/2 transport with the policy it needs: GOAWAY at a connection age,
ping enforcement, stream limits.

On start it prints one line, `READY <grpc port> <control port>`, both ports chosen by the
kernel (no race for a free port). The control port takes one JSON command per line and
answers one JSON line:

- `{"op": "stats"}`: what the server saw: calls per method, distinct client connections
  (peers), calls in flight now and at most, calls the client cancelled, calls failed on
  request, and the time left to the last call's deadline when it arrived (`null`: none);
- `{"op": "set", ...}`: how `Check` answers from now on: `delay_ms` before answering,
  `fail_rate` (0 to 1) and `fail_code` (a status name) for failures, `pushback_ms` (sent as
  `grpc-retry-pushback-ms` on failures; a string is sent as it is), `headers_first` (send
  the response headers before failing, so the answer is not trailers-only); and how
  `Watch` answers: `watch_code` (a status name: fail at once with it), `watch_break_ms`
  (send the current status, then fail with INTERNAL after that long);
- `{"op": "attempts"}`: each `Check` call that carried a `call-id`, as `[call id,
  grpc-previous-rpc-attempts or null, seconds since the server started, failed]`;
- `{"op": "health", "service": "", "status": "NOT_SERVING"}`: sets a health status (Watch
  streams see it);
- `{"op": "goaway"}`: stops the server gracefully (GOAWAY on every connection; calls in
  flight get `grace_ms` to finish).

Nothing here is tower-sd's: a test that passes against it passes against C-core.
"""

import asyncio
import json
import random
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer


class Stats:
    def __init__(self):
        self.calls = {}
        self.peers = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0
        self.failed = 0
        # The time left to the last call's deadline when it arrived (None: no deadline).
        self.deadline = None
        # Calls that carried a `call-id` (see the module docs).
        self.attempts = []


class Behaviour:
    def __init__(self):
        self.delay_ms = 0
        self.fail_rate = 0.0
        self.fail_code = "UNAVAILABLE"
        self.pushback_ms = None
        self.headers_first = False
        self.watch_code = None
        self.watch_break_ms = None


class Servicer(HealthServicer):
    """The reference health servicer, counting what it serves and failing on request."""

    def __init__(self, stats, behaviour):
        super().__init__()
        self.stats = stats
        self.behaviour = behaviour

    def _enter(self, method, context):
        stats = self.stats
        stats.calls[method] = stats.calls.get(method, 0) + 1
        stats.peers.add(context.peer())
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        stats.deadline = context.time_remaining()

    def _leave(self, context, cancelled=False):
        self.stats.in_flight -= 1
        if cancelled or context.cancelled():
            self.stats.cancelled += 1

    async def Check(self, request, context):
        self._enter("Check", context)
        cancelled = False
        try:
            behaviour = self.behaviour
            fail = bool(behaviour.fail_rate) and random.random() < behaviour.fail_rate
            metadata = dict(context.invocation_metadata())
            if "call-id" in metadata:
                previous = metadata.get("grpc-previous-rpc-attempts")
                since = asyncio.get_running_loop().time() - STARTED
                self.stats.attempts.append([metadata["call-id"], previous, since, fail])
            if behaviour.delay_ms:
                await asyncio.sleep(behaviour.delay_ms / 1000)
            if fail:
                self.stats.failed += 1
                if behaviour.headers_first:
                    await context.send_initial_metadata(())
                if behaviour.pushback_ms is not None:
                    context.set_trailing_metadata(
                        (("grpc-retry-pushback-ms", str(behaviour.pushback_ms)),)
                    )
                await context.abort(getattr(grpc.StatusCode, behaviour.fail_code), "failing on request")
            return await super().Check(request, context)
        except asyncio.CancelledError:
            # The client reset the stream: C-core cancels the handler's task.
            cancelled = True
            raise
        finally:
            self._leave(context, cancelled)

    async def Watch(self, request, context):
        self._enter("Watch", context)
        try:
            behaviour = self.behaviour
            if behaviour.watch_code is not None:
                await context.abort(getattr(grpc.StatusCode, behaviour.watch_code), "on request")
            if behaviour.watch_break_ms is not None:
                status = self._server_status.get(
                    request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                )
                await context.write(health_pb2.HealthCheckResponse(status=status))
                await asyncio.sleep(behaviour.watch_break_ms / 1000)
                await context.abort(grpc.StatusCode.INTERNAL, "breaking the stream on request")
            await super().Watch(request, context)
        finally:
            self._leave(context)


async def control(reader, writer, server, servicer, stats, behaviour):
    while line := await reader.readline():
        command = json.loads(line)
        op = command.pop("op")
        answer = {"ok": True}
        if op == "stats":
            answer = {
                "calls": stats.calls,
                "peers": len(stats.peers),
                "in_flight": stats.in_flight,
                "max_in_flight": stats.max_in_flight,
                "cancelled": stats.cancelled,
                "failed": stats.failed,
                "deadline": stats.deadline,
            }
        elif op == "attempts":
            answer = {"attempts": stats.attempts}
        elif op == "set":
            for key, value in command.items():
                setattr(behaviour, key, value)
        elif op == "health":
            status = getattr(health_pb2.HealthCheckResponse, command["status"])
            await servicer.set(command.get("service", ""), status)
        elif op == "goaway":
            asyncio.ensure_future(server.stop(command.get("grace_ms", 1000) / 1000))
        else:
            answer = {"ok": False, "error": f"unknown op {op}"}
        writer.write((json.dumps(answer) + "\n").encode())
        await writer.drain()
    writer.close()


STARTED = 0.0


async def main():
    global STARTED
    STARTED = asyncio.get_running_loop().time()
    options = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    stats, behaviour = Stats(), Behaviour()
    server = grpc.aio.server(options=list(options.items()))
    servicer = Servicer(stats, behaviour)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    listener = await asyncio.start_server(
        lambda r, w: control(r, w, server, servicer, stats, behaviour), "127.0.0.1", 0
    )
    control_port = listener.sockets[0].getsockname()[1]
    print(f"READY {port} {control_port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())

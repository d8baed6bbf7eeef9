"""bench.py: a load generator for chat.py, and the bare server it compares with.

`python bench.py` measures the chat server the way redis-benchmark measures
Redis: it starts `python chat.py server` (or uses --server), brings --clients
members online, each on a TCP connection of its own, has --senders of them
send --messages messages at --rate a second (0: as fast as they can), and
times every delivery from the Send to its arrival at each member.
--baseline runs the same load against `python bench.py baseline`, a bare
grpc.aio fan-out server with no storage and no checks (BaselineServicer
below), so every figure also shows as a ratio to what Python gRPC does with
no work at all.

The load generator is one grpc.aio process: N channels on one event loop.
It shares the machine with the server, so absolute figures mean little;
ratios to the baseline, measured in the same run, do.

This is a tool, not part of the lesson: it imports chat.py, never the
reverse. README's "Performance" section has the figures and the commands.
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

import chat  # sets GRPC_VERBOSITY before grpc is imported
from chat import (PASSWORD_KEY, RETRY, Refused, ServerProcess,
                  ThrottledReadReceipts, join_refusal, listen, pb,
                  server_options, services, until_stopped)

import grpc  # noqa: E402  (after chat, see above)


class BaselineServicer:
    """The least a fan-out server can do: no storage, no checks, no limits.
    Each Send builds one Event and puts it, as an object, in every other
    member's queue; gRPC serializes it once per member as it writes it."""

    def __init__(self):
        self.queues = {}  # member id -> asyncio.Queue, unbounded
        self.seq = 0

    async def Join(self, request, context):
        queue_ = self.queues[request.client_id] = asyncio.Queue()
        yield pb.Event(welcome=pb.Welcome())
        yield pb.Event(caught_up=pb.CaughtUp())
        try:
            while True:
                yield await queue_.get()
        finally:
            if self.queues.get(request.client_id) is queue_:
                del self.queues[request.client_id]

    async def Send(self, request, context):
        self.seq += 1
        message = pb.ChatMessage(seq=self.seq, sender_id=request.client_id,
                                 sender_name=request.client_id,
                                 text=request.text)
        message.sent_at.GetCurrentTime()  # the same bytes on the wire as ours
        event = pb.Event(messages=[message])
        for client_id, queue_ in self.queues.items():
            if client_id != request.client_id:
                queue_.put_nowait(event)
        return pb.SendReply(seq=self.seq)

    async def MarkRead(self, request, context):
        return pb.MarkReadReply(read_seq=request.up_to_seq)

    async def ListMembers(self, request, context):
        return pb.ListMembersReply()


async def serve_baseline(args):
    server = grpc.aio.server(options=server_options(30))
    services.add_ChatRoomServicer_to_server(BaselineServicer(), server)
    port = listen(server, args.host, args.port)
    await server.start()
    print(f"listening on {args.host}:{port}", flush=True)
    await until_stopped()
    await server.stop(None)
    return 0


def run_baseline(args):
    return asyncio.run(serve_baseline(args))


def percentile(sorted_values, fraction):
    """The value that `fraction` of them do not exceed, to 0.1; None if
    there are none (nothing was delivered)."""
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1,
                                   int(fraction * len(sorted_values)))], 1)


class BenchFailed(Exception):
    """The load could not run; the message is a sentence for the user."""


class Bench:
    """One benchmark run against one server; see the top of this file."""

    def __init__(self, target, server, clients, messages, rate, senders,
                 progress):
        self.target = target
        self.server = server  # a ServerProcess, or None
        self.clients, self.messages = clients, messages
        self.rate, self.senders = rate, senders
        self.progress = progress
        self.ids = [f"b{n}" for n in range(clients)]
        # received[member index] = list of message numbers, in arrival order
        self.received = [[] for _ in range(clients)]
        self.seqs = [[] for _ in range(clients)]
        self.confirming = [False] * clients  # a MarkRead is on its way
        self.tasks = set()  # MarkRead tasks, kept from the garbage collector
        self.timers = []    # MarkReads scheduled for later
        self.stop_confirming = False  # set for the idle measurement
        self.retries = 0    # Sends tried again (shed by an overloaded server)
        self.latencies_ms = []
        self.joined = 0
        self.joined_changed = asyncio.Event()
        self.last_arrival = 0.0
        self.all_delivered = asyncio.Event()
        self.idle_cpu_s = None  # measured by run() while all are online
        self.expected = messages * (clients - 1)
        self.failure = None  # why a member's stream ended, if one did
        self.shown = False   # a progress line is on stderr
        password = os.environ.get("CHAT_PASSWORD")
        self.metadata = ((PASSWORD_KEY, password),) if password else ()

    async def run(self):
        # One channel per member. grpcio shares one TCP connection among
        # channels to the same target (its global subchannel pool); a local
        # pool per channel gives each member a connection of its own.
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(self.target, options)
                         for _ in self.ids]
        stubs = [services.ChatRoomStub(channel) for channel in self.channels]
        self.readers = []
        try:
            return await self._run(stubs)
        finally:
            for task in self.readers:
                task.cancel()
            for channel in self.channels:
                await channel.close()

    async def _run(self, stubs):
        started = time.perf_counter()
        # Join in steps of 50: a burst of thousands of calls at once makes
        # core shed some of them (the server cannot accept them that fast).
        for first in range(0, self.clients, 50):
            for index in range(first, min(first + 50, self.clients)):
                self.readers.append(
                    asyncio.create_task(self._member(stubs, index)))
            while self.joined < min(first + 50, self.clients):
                await self.joined_changed.wait()
                self.joined_changed.clear()
                if self.failure:
                    raise BenchFailed(self.failure)
            self._show(f"joined {self.joined}/{self.clients}")
        join_s = time.perf_counter() - started
        # Let the joins' aftermath pass (presence lists to everyone, the
        # last Welcomes): what we measure next is the steady state.
        self._show("settling for 2 s")
        await asyncio.sleep(2)

        started = time.perf_counter()
        if self.rate:
            sends = []
            for number in range(self.messages):
                delay = started + number / self.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sends.append(asyncio.create_task(self._send(stubs, number)))
            await asyncio.gather(*sends)
        else:
            await asyncio.gather(*[self._sender(stubs, k)
                                   for k in range(self.senders)])
        try:
            await asyncio.wait_for(self.all_delivered.wait(), 60)
        except asyncio.TimeoutError:
            pass
        if self.failure:
            raise BenchFailed(self.failure)
        deliver_s = self.last_arrival - started
        if self.server:  # everyone online, nothing to do: CPU should be 0
            self.stop_confirming = True
            for timer in self.timers:
                timer.cancel()
            await asyncio.gather(*self.tasks)  # the last MarkReads
            await asyncio.sleep(1)
            before = self.server.cpu_s()
            await asyncio.sleep(5)
            self.idle_cpu_s = self.server.cpu_s() - before
        return join_s, deliver_s

    async def _member(self, stubs, index):
        call = stubs[index].Join(pb.JoinRequest(client_id=self.ids[index],
                                                name=self.ids[index]),
                                 metadata=self.metadata)
        joined = False
        try:
            async for event in call:
                for message in event.messages:
                    now = time.perf_counter()
                    number, sent_at = message.text.split()[1:3]
                    self.latencies_ms.append((now - float(sent_at)) * 1000)
                    self.received[index].append(int(number))
                    self.seqs[index].append(message.seq)
                    self.last_arrival = now
                    if len(self.latencies_ms) == self.expected:
                        self.all_delivered.set()
                if (event.messages and not self.confirming[index]
                        and not self.stop_confirming):
                    self.confirming[index] = True  # like ThrottledReadReceipts
                    self.timers.append(asyncio.get_running_loop().call_later(
                        ThrottledReadReceipts.pause(),
                        lambda i=index: self.tasks.add(asyncio.create_task(
                            self._confirm(stubs[i], i)))))
                if event.HasField("caught_up"):
                    joined = True
                    self.joined += 1
                    self.joined_changed.set()
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED:
                return  # by us: the run is over
            if joined:
                self._fail(f"member {self.ids[index]} lost its stream: "
                           f"{error.details()}")
            elif error.code() == grpc.StatusCode.UNAVAILABLE:
                self._fail(join_refusal(Refused(error.code(),
                                                error.details()),
                                        self.target))
            else:
                self._fail(f"the server refused member {self.ids[index]}: "
                           f"{error.details()}")

    def _fail(self, sentence):
        """Runs on the loop: stop waiting for joins and deliveries."""
        self.failure = self.failure or sentence
        self.joined_changed.set()
        self.all_delivered.set()

    async def _confirm(self, stub, index):
        """MarkRead up to the last seq received, as our clients do."""
        try:
            await stub.MarkRead(pb.MarkReadRequest(
                client_id=self.ids[index], up_to_seq=self.seqs[index][-1]),
                timeout=60, metadata=self.metadata)
        except grpc.aio.AioRpcError:
            pass  # leaving, or shed under load: the next one covers it
        self.confirming[index] = False
        self.tasks.discard(asyncio.current_task())

    async def _send(self, stubs, number):
        sender = number % self.senders
        text = f"bench {number} {time.perf_counter():.6f}"
        request = pb.SendRequest(client_id=self.ids[sender], text=text,
                                 message_id=f"m{number}")
        for attempt in range(10):  # as ChatClient.send retries
            try:
                await stubs[sender].Send(request, timeout=60,
                                         metadata=self.metadata)
                break
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRY:
                    raise BenchFailed(f"the server refused a Send: "
                                      f"{error.details()}") from None
                self.retries += 1
                await asyncio.sleep(0.1 * 2 ** attempt)
        if number % 10 == 0:
            self._show(f"sent {number + 1}/{self.messages}, delivered "
                       f"{len(self.latencies_ms):,}/{self.expected:,}")

    async def _sender(self, stubs, sender):
        for number in range(sender, self.messages, self.senders):
            await self._send(stubs, number)

    def _show(self, text):
        """Progress, on one line of stderr that keeps being rewritten."""
        if self.progress:
            print(f"\r{self.target}: {text}   ", end="", file=sys.stderr,
                  flush=True)
            self.shown = True

    def check(self):
        """How many deliveries were lost, duplicated or out of order."""
        lost = duplicated = reordered = 0
        for index, numbers in enumerate(self.received):
            expected = {n for n in range(self.messages)  # not its own
                        if n % self.senders != index}
            lost += len(expected - set(numbers))
            duplicated += len(numbers) - len(set(numbers))
            seqs = self.seqs[index]
            reordered += sum(1 for a, b in zip(seqs, seqs[1:]) if b <= a)
        return lost, duplicated, reordered


def bench_one(args, command, label, script=chat.__file__):
    """Run the load against one server; return a dict of figures."""
    server = ServerProcess(command, script=script) if command else None
    target = server.address if server else args.server
    bench = None
    try:
        cpu_before = server.cpu_s() if server else 0.0
        bench = Bench(target, server, args.clients, args.messages, args.rate,
                      args.senders, progress=not args.json)
        join_s, deliver_s = asyncio.run(bench.run())
        lost, duplicated, reordered = bench.check()
        latencies = sorted(bench.latencies_ms)
        result = {
            "server": label, "clients": args.clients,
            "messages": args.messages, "rate": args.rate,
            "senders": args.senders, "join_s": round(join_s, 2),
            "deliveries": len(latencies),
            "deliveries_per_s": round(len(latencies) / deliver_s)
            if deliver_s > 0 else 0,
            "latency_ms": {name: percentile(latencies, q)
                           for name, q in (("p50", .5), ("p90", .9),
                                           ("p99", .99), ("max", 1.0))},
            "lost": lost, "duplicated": duplicated, "reordered": reordered,
            "send_retries": bench.retries,
        }
        if server:
            result["server_cpu_s"] = round(server.cpu_s() - cpu_before, 2)
            result["server_peak_rss_mb"] = server.peak_rss_mb()
            result["server_ready_s"] = round(server.ready_s, 3)
            result["server_idle_cpu_percent"] = round(
                bench.idle_cpu_s / 5 * 100, 1)
        return result
    finally:
        if server:
            server.stop()
        if bench and bench.shown:
            print(file=sys.stderr)  # end the progress line


def bench_problem(args):
    """What makes the flags unusable for a run, as a sentence, or None."""
    if args.clients < 2:
        return "--clients must be 2 or more: one sends, the others receive"
    if args.messages < 1:
        return "--messages must be 1 or more"
    if not 1 <= args.senders <= args.clients:
        return "--senders must be from 1 to --clients"
    if args.rate < 0:
        return "--rate must be 0 (as fast as possible) or more"
    return None


def run_bench(args):
    if problem := bench_problem(args):
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        command = None if args.server else [
            "server", "--port", "0", "--rate", "0", "--log-level", "WARNING",
            "--db", os.path.join(tmp, "bench.db")]
        try:
            runs.append(bench_one(args, command, "chat.py"))
            if args.baseline:
                runs.append(bench_one(args, ["baseline", "--port", "0"],
                                      "baseline", script=__file__))
        except (BenchFailed, RuntimeError) as error:
            print(f"bench: {error}", file=sys.stderr)
            return 1
    if args.baseline:
        ours, bare = runs
        runs.append({"server": "ratio chat.py/baseline", **{
            "join_s": _ratio(ours["join_s"], bare["join_s"]),
            "deliveries_per_s": _ratio(ours["deliveries_per_s"],
                                       bare["deliveries_per_s"]),
            "latency_ms": {name: _ratio(ours["latency_ms"][name],
                                        bare["latency_ms"][name])
                           for name in ours["latency_ms"]},
            "server_cpu_s": _ratio(ours.get("server_cpu_s"),
                                   bare.get("server_cpu_s"))}})
    if args.json:
        print(json.dumps(runs, indent=2))
    else:
        for run in runs:
            print_run(run)
    broken = runs[0]["lost"] or runs[0]["duplicated"] or runs[0]["reordered"]
    return 1 if broken else 0


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def print_run(run):
    latency = run["latency_ms"]
    print(f"== {run['server']}")
    if "clients" not in run:  # the line of ratios
        def ratio(value):
            return "n/a" if value is None else f"{value}x"
        print(f"   join time {ratio(run['join_s'])}, deliveries/s "
              f"{ratio(run['deliveries_per_s'])}, latency p50 "
              f"{ratio(latency['p50'])} p90 {ratio(latency['p90'])} p99 "
              f"{ratio(latency['p99'])}, server CPU "
              f"{ratio(run['server_cpu_s'])}")
        return
    print(f"   {run['clients']} clients, {run['messages']} messages at "
          f"{run['rate'] or 'max'}/s from {run['senders']} sender(s)")
    print(f"   join time          {run['join_s']} s")
    print(f"   deliveries/s       {run['deliveries_per_s']}")
    if latency["p50"] is None:
        print("   latency ms         none: nothing was delivered")
    else:
        print(f"   latency ms         p50 {latency['p50']}  p90 "
              f"{latency['p90']}  p99 {latency['p99']}  max {latency['max']}")
    for key, label in (("server_cpu_s", "server CPU s"),
                       ("server_peak_rss_mb", "server peak RSS MB"),
                       ("server_idle_cpu_percent", "server idle CPU %"),
                       ("server_ready_s", "server ready in s")):
        if run.get(key) is not None:
            print(f"   {label:<18} {run[key]}")
    print(f"   lost {run['lost']}, duplicated {run['duplicated']}, "
          f"reordered {run['reordered']} (of {run['deliveries']:,} "
          "deliveries)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Load generator for chat.py: fan-out latency and "
        "throughput, optionally against a bare baseline server. "
        "`python bench.py baseline` runs that baseline server by itself.")
    parser.add_argument("--server", metavar="HOST:PORT",
                        help="measure this server (default: start one, with "
                        "a temporary database and --rate 0)")
    parser.add_argument("--clients", type=int, default=100,
                        help="members online, each on its own connection "
                        "(default: %(default)s)")
    parser.add_argument("--messages", type=int, default=100,
                        help="messages to send in all (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=0,
                        help="messages a second; 0: as fast as possible "
                        "(default: %(default)s)")
    parser.add_argument("--senders", type=int, default=1,
                        help="how many of the members send (default: "
                        "%(default)s)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the load against the bare baseline "
                        "server and show ratios")
    parser.add_argument("--json", action="store_true",
                        help="print the figures as JSON")
    return parser


def build_baseline_parser():
    parser = argparse.ArgumentParser(
        prog="bench.py baseline",
        description="Run the bare grpc.aio fan-out server that `bench.py "
        "--baseline` compares the chat server with: it stores nothing, "
        "checks nothing and limits nothing. Not a chat room for people.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=chat.PORT, default=50052,
                        help="port to listen on (default: %(default)s; "
                        "0 picks a free one)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["baseline"]:
        args = build_baseline_parser().parse_args(argv[1:])
        try:
            return run_baseline(args)
        except chat.StartUpError as error:
            print(f"bench.py baseline: {error}", file=sys.stderr)
            return 1
    return run_bench(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

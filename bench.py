"""bench.py: a load generator for chat.py, and a bare server to compare with.

`python bench.py` measures the chat server the way redis-benchmark measures
Redis: it starts `python chat.py server` (or uses --server), brings --clients
members online, each on a TCP connection of its own, has --senders of them
send --messages messages at --rate a second (0: as fast as they can), and
times every delivery from the Send to its arrival at each member.
--baseline runs the same load against `python bench.py baseline`, a bare
grpc.aio fan-out server with no storage and no checks (BaselineServicer
below), so every figure also shows as a ratio to what Python gRPC does with
no work at all. --plain runs it against `python chat.py server --plain` too:
chat.py's Part I classes, without the Part III machinery for a thousand
members. The runs go baseline, Part I, Part III, and show side by side.

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
import re
import signal
import sys
import tempfile
import time
import traceback
import uuid

import chat  # sets GRPC_VERBOSITY before grpc is imported
from chat import (RETRY, Diagnose, Refused, ServerProcess,
                  ThrottledReadReceipts, listen, password_metadata, pb,
                  retry_delays, server_options, services, until_stopped)

import grpc  # noqa: E402  (after chat, see above)


class BaselineServicer:
    """The least a fan-out server can do: no storage, no checks, no limits.
    Each Send builds one Event and puts it, as an object, in every other
    member's queue; gRPC serializes it once per member as it writes it."""

    def __init__(self):
        self.queues = {}  # member id -> asyncio.Queue, unbounded
        self.seq = 0

    async def Join(self, request, context):
        # context.write, as chat.py's Join, so both servers write alike.
        queue_ = self.queues[request.client_id] = asyncio.Queue()
        try:
            await context.write(pb.Event(welcome=pb.Welcome()))
            await context.write(pb.Event(caught_up=pb.CaughtUp()))
            while True:
                await context.write(await queue_.get())
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
    port = listen(server, args.host, args.port, None, Diagnose())
    await server.start()
    print(f"listening on {args.host}:{port}", flush=True)
    await until_stopped()
    await server.stop(None)
    return 0


def run_baseline(args):
    return asyncio.run(serve_baseline(args))


class MeasuredServer(ServerProcess):
    """A server we started, with its start-up time, CPU and memory."""

    def __init__(self, command, stderr, script):
        started = time.perf_counter()
        super().__init__(command, stderr=stderr, script=script)
        self.ready_s = time.perf_counter() - started  # to "listening on"

    def cpu_s(self):
        """User + system CPU seconds so far, from /proc."""
        with open(f"/proc/{self.popen.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self):
        with open(f"/proc/{self.popen.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return None


def percentile(sorted_values, fraction):
    """The value that `fraction` of them do not exceed, to 0.1; None if
    there are none (nothing was delivered)."""
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1,
                                   int(fraction * len(sorted_values)))], 1)


class BenchFailed(Exception):
    """The load could not run; the message is a sentence for the user."""


def described(error):
    """An unexpected exception as one sentence: its type, its message and
    the line of bench.py (or chat.py) that raised it."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames
            if os.path.basename(frame.filename) in ("bench.py", "chat.py")]
    where = (ours or frames or [None])[-1]
    at = (f" (at {os.path.basename(where.filename)} line {where.lineno})"
          if where else "")
    return f"{type(error).__name__}: {error}{at}"


class Bench:
    """One benchmark run against one server; see the top of this file.
    Everything runs on one event loop, so nothing here needs a lock."""

    JOIN_STEP = 50  # members that join at once
    STORM_EVERY = 0.05  # --storm: seconds between steps, not waiting
    JOIN_ATTEMPTS = 20  # --storm: tries of a Join shed before its Welcome
    SEND_ATTEMPTS = 10  # tries of a Send shed by an overloaded server

    def __init__(self, label, target, server, args, progress):
        self.label, self.target = label, target
        self.server = server  # a MeasuredServer, or None
        self.clients, self.messages = args.clients, args.messages
        self.rate, self.senders = args.rate, args.senders
        self.idle_s = args.idle  # 0: no idle CPU measurement
        self.storm = args.storm
        self.welcomed = set()  # members whose Welcome came
        self.joins_failed = {}  # --storm: status code name -> Joins it ended
        self.progress = progress
        self.ids = [f"b{n}" for n in range(self.clients)]
        # Our messages read "bench RUN NUMBER SENT_AT": RUN is this run's
        # own, so a room's other messages (people's, an earlier run's) are
        # told apart and not measured; see _ours.
        self.run_id = uuid.uuid4().hex[:12]
        self.own_text = re.compile(
            rf"bench {self.run_id} ([0-9]+) ([0-9]+\.[0-9]+)")
        self.others = 0  # messages that were not ours, ignored
        self.last_seq = [0 for _ in self.ids]  # of any message, for MarkRead
        # received[member index] = message numbers, in arrival order
        self.received = [[] for _ in self.ids]
        self.seqs = [[] for _ in self.ids]
        # member index -> the task of its next MarkRead (held here, too,
        # so that the garbage collector leaves it alone)
        self.receipts = {}
        self.stop_confirming = False  # set for the idle measurement
        self.retries = 0    # Sends tried again (shed by an overloaded server)
        self.latencies_ms = []
        self.caught_up = set()  # indexes of members that are online
        self.members = []       # their Join tasks
        self.joined_changed = asyncio.Event()
        self.last_arrival = 0.0  # of a message
        self.last_event = 0.0    # of any event
        self.all_delivered = asyncio.Event()
        self.idle_cpu_percent = None  # while all are online, if server
        self.expected = self.messages * (self.clients - 1)
        self.failure = None  # why the run must end, if it must (see _fail)
        self.failed = asyncio.Event()  # set with it
        self.shown = False   # a progress line is on stderr
        self.metadata = password_metadata(os.environ.get("CHAT_PASSWORD"))

    async def run(self):
        """Join everyone, send, wait for every delivery; then, if we
        started the server, measure its CPU while all sit idle. Returns
        (seconds to join, seconds from the first Send to the last
        delivery)."""
        # One channel per member. grpcio shares one TCP connection among
        # channels to the same target (its global subchannel pool); a local
        # pool per channel gives each member a connection of its own.
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(self.target, options)
                    for _ in self.ids]
        stubs = [services.ChatRoomStub(channel) for channel in channels]
        try:
            return await self._unless_failed(self._steps(stubs))
        finally:
            for task in [*self.members, *self.receipts.values()]:
                task.cancel()
            for channel in channels:
                await channel.close()

    async def _steps(self, stubs):
        join_s = await self._join_all(stubs)
        await self._settle()
        deliver_s = await self._send_all(stubs)
        if self.server and self.idle_s:
            self.idle_cpu_percent = await self._idle_cpu()
        return join_s, deliver_s

    async def _unless_failed(self, steps):
        """Run the steps, but end them the moment anything fails (_fail):
        whatever they are waiting for then may never come. An unexpected
        exception in them becomes a BenchFailed too."""
        task = asyncio.create_task(steps)
        failed = asyncio.create_task(self.failed.wait())
        try:
            await asyncio.wait({task, failed},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
            task.cancel()  # if it still runs; then let it end
            await asyncio.gather(task, return_exceptions=True)
        if self.failure:
            raise BenchFailed(self.failure)
        try:
            return task.result()
        except BenchFailed:
            raise
        except Exception as error:
            raise BenchFailed(f"the run failed: {described(error)}") from None

    def _spawn(self, coroutine, who):
        """A task whose unexpected exception ends the run (_fail), with a
        sentence that names who failed, instead of going unnoticed."""
        task = asyncio.create_task(coroutine)

        def check(task):
            if not task.cancelled() and task.exception():
                self._fail(f"{who} failed: {described(task.exception())}")
        task.add_done_callback(check)
        return task

    async def _join_all(self, stubs):
        """Bring every member online, JOIN_STEP at a time: each step once
        the last is in, or with --storm every STORM_EVERY seconds, as
        after a restart of the server, when everyone rejoins at once."""
        started = time.perf_counter()
        for first in range(0, self.clients, self.JOIN_STEP):
            step = range(first, min(first + self.JOIN_STEP, self.clients))
            self.members += [
                self._spawn(self._member(stubs, index),
                            f"member {self.ids[index]}")
                for index in step]
            if self.storm:
                await asyncio.sleep(self.STORM_EVERY)
            else:
                await self._until_caught_up(step.stop)
        await self._until_caught_up(self.clients)  # the storm's tail
        return time.perf_counter() - started

    async def _until_caught_up(self, count):
        """Wait until count members have caught up (or _unless_failed ends
        the run)."""
        while len(self.caught_up) < count:
            await self.joined_changed.wait()
            self.joined_changed.clear()
        self._show(f"joined {len(self.caught_up)}/{self.clients}")

    async def _settle(self, quiet_s=1.0, at_most_s=60):
        """Wait for the joins' aftermath to pass: until no event (presence
        changes, the last Welcomes) has come for quiet_s. What we measure
        next is the steady state, not the tail of the joins."""
        self._show("waiting for the room to fall quiet")
        give_up = time.perf_counter() + at_most_s
        while time.perf_counter() < min(self.last_event + quiet_s, give_up):
            await asyncio.sleep(0.1)

    async def _send_all(self, stubs):
        started = time.perf_counter()
        if self.rate:
            await self._send_at_rate(stubs, started)
        else:
            await asyncio.gather(*[self._sender(stubs, k)
                                   for k in range(self.senders)])
        try:
            await asyncio.wait_for(self.all_delivered.wait(), 60)
        except asyncio.TimeoutError:
            pass  # check() counts what is missing
        return self.last_arrival - started

    async def _send_at_rate(self, stubs, started):
        """Start Send number n at started + n/rate, not waiting for the
        ones before it to be answered."""
        sends = []
        for number in range(self.messages):
            delay = started + number / self.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sends.append(asyncio.create_task(self._send(stubs, number)))
        try:
            await asyncio.gather(*sends)
        finally:  # if one failed, or the run was stopped: the others too
            for send in sends:
                send.cancel()

    async def _sender(self, stubs, sender):
        """As fast as one member can: each Send once the last is answered."""
        for number in range(sender, self.messages, self.senders):
            await self._send(stubs, number)

    async def _send(self, stubs, number):
        sender = number % self.senders
        text = f"bench {self.run_id} {number} {time.perf_counter():.6f}"
        # The server keeps message ids for good: an earlier run's "m3" from
        # b0 would make this one's a retry, stored once already.
        request = pb.SendRequest(client_id=self.ids[sender], text=text,
                                 message_id=f"bench-{self.run_id}-{number}")
        delays = retry_delays()  # as ChatClient.send, but not for ever
        for attempt in range(1, self.SEND_ATTEMPTS + 1):
            try:
                await stubs[sender].Send(request, timeout=60,
                                         metadata=self.metadata)
                break
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRY:
                    raise BenchFailed(f"the server refused a Send: "
                                      f"{error.details()}") from None
                if attempt == self.SEND_ATTEMPTS:
                    raise BenchFailed(f"the server did not take a Send in "
                                      f"{attempt} tries: {error.details()}"
                                      ) from None
                self.retries += 1
                await asyncio.sleep(next(delays))
        if number % 10 == 0:
            self._show(f"sent {number + 1}/{self.messages}, delivered "
                       f"{len(self.latencies_ms):,}/{self.expected:,}")

    async def _idle_cpu(self):
        """The server's CPU use, in percent of one core, over --idle s with
        everyone online and nothing to do: it should be 0. MarkReads still
        planned are called off."""
        self.stop_confirming = True
        for task in self.receipts.values():
            task.cancel()
        await asyncio.sleep(1)
        before = self.server.cpu_s()
        await asyncio.sleep(self.idle_s)
        return (self.server.cpu_s() - before) / self.idle_s * 100

    async def _member(self, stubs, index):
        """One member's Join stream, until the run cancels it. With
        --storm, a Join that ends before its Welcome with a code our
        clients retry is counted, and tried again after a pause, as they
        do."""
        delays = retry_delays()
        for attempt in range(1, self.JOIN_ATTEMPTS + 1):
            call = stubs[index].Join(
                pb.JoinRequest(client_id=self.ids[index],
                               name=self.ids[index]), metadata=self.metadata)
            try:
                async for event in call:
                    self._arrived(stubs[index], index, event)
                error = None  # the server ended it with OK
            except grpc.aio.AioRpcError as rpc_error:
                error = rpc_error
            # Our own cancel raises CancelledError, not AioRpcError, and
            # does not get here: any end of the stream that gets here is a
            # failure. (A CANCELLED from the server is one too: it shed the
            # call.)
            if not (self.storm and error and error.code() in RETRY
                    and index not in self.welcomed
                    and attempt < self.JOIN_ATTEMPTS):
                break
            code = error.code().name
            self.joins_failed[code] = self.joins_failed.get(code, 0) + 1
            await asyncio.sleep(next(delays))
        self._fail(self._why_lost(index, error))

    def _arrived(self, stub, index, event):
        """Note each of our messages' latency and number, and plan a
        MarkRead (for every message, ours or not)."""
        now = self.last_event = time.perf_counter()  # one for the event
        if event.HasField("welcome"):
            self.welcomed.add(index)
        for message in event.messages:
            self.last_seq[index] = message.seq
            if (ours := self._ours(message)) is None:
                self.others += 1
                continue
            number, sent_at = ours
            self.latencies_ms.append((now - sent_at) * 1000)
            self.received[index].append(number)
            self.seqs[index].append(message.seq)
            self.last_arrival = now
        if len(self.latencies_ms) >= self.expected:
            self.all_delivered.set()
        if event.messages:
            self._plan_receipt(stub, index)
        if event.HasField("caught_up"):
            self.caught_up.add(index)
            self.joined_changed.set()

    def _ours(self, message):
        """(number, perf_counter at its Send) if this run sent message,
        else None: its text is ours to the letter, with this run's id, a
        number we send, from the member who sends that number."""
        match = self.own_text.fullmatch(message.text)
        if not match:
            return None
        number = int(match[1])
        if (number >= self.messages
                or message.sender_id != self.ids[number % self.senders]):
            return None
        return number, float(match[2])

    def _plan_receipt(self, stub, index):
        """As chat.py's default client (ThrottledReadReceipts): one
        MarkRead 2.5 to 7.5 s (at random) after a message arrives, for
        everything received by then."""
        if index not in self.receipts and not self.stop_confirming:
            self.receipts[index] = self._spawn(
                self._confirm(stub, index),
                f"member {self.ids[index]}'s MarkRead")

    async def _confirm(self, stub, index):
        """After the pause, MarkRead up to the last seq received."""
        await asyncio.sleep(ThrottledReadReceipts.pause())
        try:
            await stub.MarkRead(pb.MarkReadRequest(
                client_id=self.ids[index], up_to_seq=self.last_seq[index]),
                timeout=60, metadata=self.metadata)
        except grpc.aio.AioRpcError:
            pass  # leaving, or shed under load: the next one covers it
        del self.receipts[index]

    def _why_lost(self, index, error):
        """A sentence for a member's stream that ended (error None: with
        OK)."""
        if error is None or index in self.caught_up:
            why = error.details() if error else "the server ended it"
            return f"member {self.ids[index]} lost its stream: {why}"
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return Diagnose().join(Refused(error.code(), error.details()),
                                   self.target)
        return (f"the server refused member {self.ids[index]}: "
                f"{error.details()}")

    def _fail(self, sentence):
        """End the run: _unless_failed stops whatever it waits for and
        raises BenchFailed(sentence) (the first one, if several fail)."""
        self.failure = self.failure or sentence
        self.failed.set()

    def _show(self, text):
        """Progress, on one line of stderr that keeps being rewritten."""
        if self.progress:
            print(f"\r{self.label}: {text}   ", end="", file=sys.stderr,
                  flush=True)
            self.shown = True

    def check(self):
        """How many deliveries were lost, duplicated or out of order."""
        lost = duplicated = reordered = 0
        everything = set(range(self.messages))
        for index, numbers in enumerate(self.received):
            got = set(numbers)
            lost += sum(1 for n in everything - got  # but its own
                        if n % self.senders != index)
            duplicated += len(numbers) - len(got)
            seqs = self.seqs[index]
            reordered += sum(1 for a, b in zip(seqs, seqs[1:]) if b <= a)
        return lost, duplicated, reordered


def chat_server(db, *flags):
    """The command line of a chat.py server for the bench: any free port,
    flood control off (one sender as fast as it can is no flood here)."""
    return ["server", *flags, "--port", "0", "--rate", "0", "--db", db,
            "--log-level", "WARNING"]


def servers_to_measure(args, tmp):
    """(label, script, command) for each server, in the order they run
    and are shown; command None means --server, already running."""
    servers = []
    if args.baseline:
        servers.append(("baseline", __file__, ["baseline", "--port", "0"]))
    if args.plain:
        servers.append(("Part I", chat.__file__, chat_server(
            os.path.join(tmp, "plain.db"), "--plain")))
    if args.server:
        servers.append((args.server, None, None))
    else:
        servers.append(("Part III", chat.__file__, chat_server(
            os.path.join(tmp, "bench.db"))))
    return servers


def start_server(label, script, command, tmp):
    """Start a server and wait for its "listening on" line. If it does not
    start, say why in one sentence: the last line of its stderr."""
    with open(os.path.join(tmp, "stderr"), "w+") as stderr:
        try:
            return MeasuredServer(command, stderr, script)
        except RuntimeError:
            stderr.seek(0)
            why = (stderr.read().strip().splitlines() or ["no reason"])[-1]
            raise BenchFailed(f"the {label} server did not start: "
                              f"{why}") from None


# What bench says when a signal stops it (its exit status: 128 + the
# signal's number, as a shell reports a process the signal killed).
STOP_SIGNALS = {signal.SIGINT: "interrupted",
                signal.SIGTERM: "stopped by SIGTERM"}


async def bench_all(args, stopped):
    """Run the load against each server in turn; return their figures.
    One event loop for all: the Join calls cancelled at the end of a run
    can complete after asyncio.run() has closed that run's loop, and
    grpc.aio then prints a traceback for each ("Event loop is closed").
    SIGINT or SIGTERM cancels it, noted in stopped: on the way out every
    server it started is stopped (bench_one) and its temporary folder, made
    under TMPDIR once the signals are caught, removed."""
    main, loop = asyncio.current_task(), asyncio.get_running_loop()

    def stop(signum):
        stopped.append(signum)
        main.cancel()
    for signum in STOP_SIGNALS:
        # Ignored, as SIGINT is for `python bench.py &` in a script: left so.
        if signal.getsignal(signum) is not signal.SIG_IGN:
            loop.add_signal_handler(signum, stop, signum)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        return [await bench_one(args, *server, tmp)
                for server in servers_to_measure(args, tmp)]


async def bench_one(args, label, script, command, tmp):
    """Run the load against one server; return a dict of figures."""
    server = start_server(label, script, command, tmp) if command else None
    progress = not args.json
    if server and progress:
        print(f"{label}: server started, pid {server.popen.pid}, listening "
              f"on {server.address}", file=sys.stderr, flush=True)
    bench = Bench(label, server.address if server else args.server, server,
                  args, progress)
    try:  # no await before it: a signal's cancel lands inside
        cpu_before = server.cpu_s() if server else 0.0
        join_s, deliver_s = await bench.run()
        result = figures(args, label, bench, join_s, deliver_s)
        if server:
            result.update(server_figures(server, bench, cpu_before))
        return result
    finally:
        if server:
            server.stop()
        if bench.shown:
            print(file=sys.stderr)  # end the progress line


def figures(args, label, bench, join_s, deliver_s):
    """What the clients measured."""
    lost, duplicated, reordered = bench.check()
    latencies = sorted(bench.latencies_ms)
    return {
        "server": label, "clients": args.clients, "messages": args.messages,
        "rate": args.rate, "senders": args.senders,
        "join_s": round(join_s, 2), "deliveries": len(latencies),
        "deliveries_per_s": round(len(latencies) / deliver_s)
        if deliver_s > 0 else 0,
        "latency_ms": {name: percentile(latencies, q)
                       for name, q in (("p50", .5), ("p90", .9),
                                       ("p99", .99), ("max", 1.0))},
        "lost": lost, "duplicated": duplicated, "reordered": reordered,
        "send_retries": bench.retries, "others_messages": bench.others,
        "joins_failed": sum(bench.joins_failed.values()),
        "joins_failed_by_code": dict(bench.joins_failed),
    }


def server_figures(server, bench, cpu_before):
    """What /proc says about a server we started."""
    return {"server_cpu_s": round(server.cpu_s() - cpu_before, 2),
            "server_peak_rss_mb": server.peak_rss_mb(),
            "server_ready_s": round(server.ready_s, 3),
            "server_idle_cpu_percent": None if bench.idle_cpu_percent is None
            else round(bench.idle_cpu_percent, 1)}


# The figures, in the order shown: (label, key, key inside it, whether it
# gets a ratio to the baseline's).
ROWS = [("join time s", "join_s", None, True),
        ("deliveries/s", "deliveries_per_s", None, True),
        *[(f"latency {q} ms", "latency_ms", q, True)
          for q in ("p50", "p90", "p99", "max")],
        ("server CPU s", "server_cpu_s", None, True),
        ("server peak RSS MB", "server_peak_rss_mb", None, True),
        ("server idle CPU %", "server_idle_cpu_percent", None, False),
        ("server ready in s", "server_ready_s", None, False),
        ("send retries", "send_retries", None, False),
        ("joins failed", "joins_failed", None, False),
        ("others' messages", "others_messages", None, False),
        *[(key, key, None, False)
          for key in ("lost", "duplicated", "reordered")]]


def figure(run, key, inner):
    """run[key], or run[key][inner]; None if the run has no such figure."""
    value = run.get(key)
    return value.get(inner) if inner and value else value


def name(key, inner):
    return f"{key}.{inner}" if inner else key


def add_ratios(runs):
    """Give every run after the baseline "vs_baseline": its figures divided
    by the baseline's, e.g. "latency_ms.p99": 1.2 for a p99 20 % longer."""
    base = runs[0]
    for run in runs[1:]:
        run["vs_baseline"] = {
            name(key, inner): _ratio(figure(run, key, inner),
                                     figure(base, key, inner))
            for _, key, inner, ratio in ROWS if ratio}


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def bench_problem(args):
    """What makes the flags unusable together, as a sentence, or None. (Each
    flag's own values are checked by its argparse type.)"""
    if args.senders > args.clients:
        return "--senders must be from 1 to --clients"
    if args.plain and args.server:
        return "--plain starts a server of its own: leave out --server"
    return None


def run_bench(args):
    if problem := bench_problem(args):
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    stopped = []  # the signal that stopped it, if one did
    try:
        runs = asyncio.run(bench_all(args, stopped))
    except (BenchFailed, asyncio.CancelledError) as error:
        if stopped:  # whatever the signal cut short
            return said_stopped(stopped[0])
        if isinstance(error, asyncio.CancelledError):
            raise
        print(f"bench: {error}", file=sys.stderr)
        return 1
    if stopped:  # just as it ended
        return said_stopped(stopped[0])
    if args.baseline:
        add_ratios(runs)
    if args.json:
        print(json.dumps(runs, indent=2))
    else:
        print_runs(runs)
    return 1 if any(run["lost"] or run["duplicated"] or run["reordered"]
                    for run in runs) else 0


def said_stopped(signum):
    print(f"bench: {STOP_SIGNALS[signum]}", file=sys.stderr)
    return 128 + signum


def print_runs(runs):
    """The runs side by side, one column each; after a figure, its ratio
    to the baseline's in brackets."""
    first = runs[0]
    print(f"{first['clients']} clients, {first['messages']} messages at "
          f"{first['rate'] or 'max'}/s from {first['senders']} sender(s)")
    print((f"{'':<20}" + "".join(f"{run['server']:<22}"
                                 for run in runs)).rstrip())
    for label, key, inner, _ in ROWS:
        cells = [cell(run, key, inner) for run in runs]
        if any(cells):
            print((f"{label:<20}" + "".join(f"{c or '-':<22}"
                                            for c in cells)).rstrip())
    for run in runs:
        if run["joins_failed_by_code"]:
            print(f"{run['server']}: joins failed: " + ", ".join(
                f"{code} {count:,}"
                for code, count in run["joins_failed_by_code"].items()))


def cell(run, key, inner):
    """One figure as text, with its ratio to the baseline if there is one."""
    value = figure(run, key, inner)
    if value is None:
        return ""
    ratio = run.get("vs_baseline", {}).get(name(key, inner))
    return f"{value:,}" if ratio is None else f"{value:,} ({ratio}x)"


AT_LEAST_1 = chat.number(int, "1 or more", lambda n: n >= 1)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Load generator for chat.py: fan-out latency and "
        "throughput, optionally against a bare baseline server. "
        "`python bench.py baseline` runs that baseline server by itself.")
    parser.add_argument("--server", metavar="HOST:PORT",
                        type=chat.server_address,  # client --server's check
                        help="measure this server (default: start one, with "
                        "a temporary database and --rate 0)")
    parser.add_argument("--clients", default=100, metavar="N",
                        type=chat.number(
                            int, "2 or more (one sends, the others receive)",
                            lambda n: n >= 2),
                        help="members online, each on its own connection "
                        "(default: %(default)s)")
    parser.add_argument("--messages", type=AT_LEAST_1, default=100,
                        metavar="M",
                        help="messages to send in all (default: %(default)s)")
    parser.add_argument("--rate", default=0, metavar="R", type=chat.number(
                            float, "0 (as fast as possible) or more",
                            lambda n: n >= 0),
                        help="messages a second; 0: as fast as possible "
                        "(default: %(default)s)")
    parser.add_argument("--senders", type=AT_LEAST_1, default=1, metavar="K",
                        help="how many of the members send (default: "
                        "%(default)s)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the load against the bare baseline "
                        "server, first, and show ratios to it")
    parser.add_argument("--plain", action="store_true",
                        help="also run it against `chat.py server --plain` "
                        "(Part I's classes), before the default server")
    parser.add_argument("--idle", type=chat.number(float, "0 or more",
                                                   lambda n: n >= 0),
                        default=5, metavar="S",
                        help="seconds of the idle CPU measurement, after "
                        "the messages (default: %(default)s; 0 skips it)")
    parser.add_argument("--storm", action="store_true",
                        help="members join %d every %g s without waiting "
                        "for the last to be in, as after a restart; a Join "
                        "refused before its Welcome is counted by its code "
                        "and tried again" % (Bench.JOIN_STEP,
                                             Bench.STORM_EVERY))
    parser.add_argument("--json", action="store_true",
                        help="print the figures as JSON")
    return parser


def build_baseline_parser():
    parser = argparse.ArgumentParser(
        prog="bench.py baseline",
        description="Run the bare grpc.aio fan-out server that `bench.py "
        "--baseline` compares the chat server with: it stores nothing, "
        "checks nothing and limits nothing. Not a chat room for people.")
    parser.add_argument("--host", default="127.0.0.1", metavar="H",
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=chat.PORT, default=50052, metavar="P",
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
    try:
        return run_bench(build_parser().parse_args(argv))
    except KeyboardInterrupt:  # Ctrl-C outside bench_all's event loop
        return said_stopped(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())

"use strict";
// moleculer.js 0.15 benchmark client; prints one JSON line of results.
//   node client.js client --transport tcp --port P --scenario rpc --inflight 64 --duration 3 ...
const readline = require("readline");
const { Readable } = require("stream");
const { PARAMS, parseArgs, makeBroker, statusKb, emitLine, makeBlock } = require("./common");

const opts = parseArgs(process.argv.slice(2));
const seed = opts.transport === "tcp" ? `${opts.host}:${opts.port}/bench-server` : null;
const broker = makeBroker(`bench-client-${process.pid}`, opts, { listenPort: 0, seed });
const now = () => process.hrtime.bigint();
const sleep = ms => new Promise(r => setTimeout(r, ms));
// The harness samples the server's CPU time at these marks; returns this process's CPU seconds.
function mark(name) {
	emitLine({ mark: name });
	const u = process.cpuUsage();
	return (u.user + u.system) / 1e6;
}

function percentiles(lat) {
	if (!lat.length) return { p50_us: 0, p99_us: 0 };
	lat.sort((a, b) => a - b);
	const at = q => lat[Math.min(lat.length - 1, Math.floor(q * lat.length))] / 1000;
	return { p50_us: at(0.5), p99_us: at(0.99) };
}

async function rpc() {
	// A timeout on every call (--timeout, seconds): moleculer.js's own call option.
	const callOpts = opts.timeout ? { timeout: opts.timeout * 1000 } : undefined;
	const echoed = await broker.call("echo.echo", PARAMS, callOpts);
	if (JSON.stringify(echoed) !== JSON.stringify(PARAMS)) throw new Error("echo mismatch");
	let warm = 0;
	const warmWorker = async () => {
		while (warm < opts.warmup) {
			warm++;
			await broker.call("echo.echo", PARAMS, callOpts);
		}
	};
	await Promise.all(Array.from({ length: opts.inflight }, warmWorker));
	const lat = [];
	let issued = 0;
	const stopAt = Date.now() + opts.duration * 1000;
	const worker = async () => {
		while (issued < opts.count && Date.now() < stopAt) {
			issued++;
			const t0 = now();
			await broker.call("echo.echo", PARAMS, callOpts);
			lat.push(Number(now() - t0));
		}
	};
	const cpu0 = mark("start");
	const start = now();
	await Promise.all(Array.from({ length: opts.inflight }, worker));
	const seconds = Number(now() - start) / 1e9;
	const cpu = mark("end") - cpu0;
	return { client_cpu_s: cpu, calls: lat.length, seconds, req_per_s: lat.length / seconds, ...percentiles(lat) };
}

async function waitCount(expected, idleTimeout = 10) {
	let last = -1, lastChange = Date.now();
	for (;;) {
		const got = await broker.call("counter.count");
		if (got >= expected) return got;
		if (got !== last) {
			last = got;
			lastChange = Date.now();
		} else if (Date.now() - lastChange > idleTimeout * 1000) return got;
		await sleep(2);
	}
}

async function events() {
	const warm = Math.min(opts.warmup, 1000);
	for (let i = 0; i < warm; i++) await broker.emit("bench.tick", PARAMS);
	await waitCount(warm);
	const cpu0 = mark("start");
	const start = now();
	for (let i = 0; i < opts.count; i++) await broker.emit("bench.tick", PARAMS);
	const sendSeconds = Number(now() - start) / 1e9;
	const got = (await waitCount(warm + opts.count)) - warm;
	const seconds = Number(now() - start) / 1e9;
	const cpu = mark("end") - cpu0;
	return { client_cpu_s: cpu, sent: opts.count, received: got, lost: opts.count - got, seconds, send_seconds: sendSeconds,
		events_per_s: got / seconds };
}

function source(size, chunk) {
	const block = makeBlock(chunk);
	let left = size;
	return new Readable({
		highWaterMark: chunk,
		read() {
			if (left <= 0) return this.push(null);
			const n = Math.min(left, chunk);
			left -= n;
			this.push(n === chunk ? block : block.subarray(0, n));
		}
	});
}

async function upload(size) {
	return broker.call("file.save", null, { stream: source(size, opts.chunk) });
}

async function download(size, rate) {
	const stream = await broker.call("file.get", { size, chunk: opts.chunk });
	const start = Date.now();
	let got = 0;
	return new Promise((resolve, reject) => {
		stream.on("data", c => {
			got += c.length;
			if (rate > 0) {
				const ahead = (got / rate) * 1000 - (Date.now() - start);
				if (ahead > 1) {
					stream.pause();
					setTimeout(() => stream.resume(), ahead);
				}
			}
		});
		stream.on("end", () => resolve(got));
		stream.on("error", reject);
	});
}

function waitGo() {
	const idle = statusKb("VmRSS");
	emitLine({ idle: true, client_rss_kb: idle });
	if (process.env.NERVE_BENCH_NO_SYNC) return Promise.resolve(idle);
	return new Promise(resolve => {
		const rl = readline.createInterface({ input: process.stdin });
		const done = () => {
			rl.close();
			resolve(idle);
		};
		rl.once("line", done);
		rl.once("close", done);
		setTimeout(done, 30000).unref();
	});
}

function isOverflow(err) {
	return !!err && (err.name === "StreamOverflowError" || err.type === "STREAM_OVERFLOW");
}

async function transfer() {
	const warm = 4 * opts.chunk;
	const w = opts.scenario === "upload" ? await upload(warm) : await download(warm, 0);
	if (w !== warm) throw new Error(`warm-up transfer: ${w} bytes`);
	const idle = await waitGo();
	const cpu0 = mark("start");
	const start = now();
	let got;
	try {
		got = opts.scenario === "upload" ? await upload(opts.size)
			: await download(opts.size, opts.scenario === "slow" ? opts.rate : 0);
	} catch (err) {
		if (!isOverflow(err)) throw err;
		// A nerve server reads this upload: Moleculer's streams have no flow control, so it
		// bounds what it holds unread (max_stream_buffer) and fails the stream beyond it.
		const seconds = Number(now() - start) / 1e9;
		const cpu = mark("end") - cpu0;
		return { client_cpu_s: cpu, stream_error: `${err.name}: ${err.message}`, stream_reader: "server", seconds,
			client_rss_idle_kb: idle, chunk: opts.chunk };
	}
	const seconds = Number(now() - start) / 1e9;
	const cpu = mark("end") - cpu0;
	if (got !== opts.size) throw new Error(`${opts.scenario}: ${got} bytes, expected ${opts.size}`);
	return { client_cpu_s: cpu, bytes: got, seconds, mb_per_s: got / seconds / 1e6, client_rss_idle_kb: idle, chunk: opts.chunk };
}

async function main() {
	const killer = setTimeout(() => {
		console.error(`moleculer client: deadline of ${opts.deadline}s reached`);
		process.exit(3);
	}, opts.deadline * 1000);
	killer.unref();
	await broker.start();
	await broker.waitForServices(["echo", "counter", "file"], 20000);
	let out;
	if (opts.scenario === "rpc") out = await rpc();
	else if (opts.scenario === "events") out = await events();
	else out = await transfer();
	out.client_rss_peak_kb = process.resourceUsage().maxRSS;
	emitLine(out);
	await broker.stop();
	process.exit(0);
}

main().catch(err => {
	console.error(err && err.stack ? err.stack : err);
	process.exit(1);
});

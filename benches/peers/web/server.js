"use strict";
// moleculer-web 0.11 on moleculer.js 0.15: the HTTP gateway peer of benches/gateway.py.
//   node server.js serve            one JSON line {"http": "http://127.0.0.1:PORT"} once serving
//   node server.js direct --count N one JSON line {"us_per_call": ...}: in-process broker.call cost
// Routes (route "/api"): POST echo -> bench.echo (JSON body as params), POST upload ->
// stream:bench.upload (the request body as ctx.stream), GET download?size=N -> bench.download
// (a Readable piped to the response, Content-Length from the size).
const { Readable } = require("stream");
const { ServiceBroker } = require("moleculer");
const ApiGateway = require("moleculer-web");

const CHUNK = 256 * 1024; // what nerve's gateway yields (its max_chunk)
const PARAMS = { id: 1, name: "bench", tags: ["a", "b", "c"], values: [1, 2, 3, 4], nested: { ok: true, ratio: 0.5 } };

function block(size) {
	const b = Buffer.alloc(size);
	for (let i = 0; i < size; i++) b[i] = (i * 31 + 7) & 0xff;
	return b;
}

const bench = {
	name: "bench",
	actions: {
		echo: ctx => ctx.params,
		upload(ctx) {
			return new Promise((resolve, reject) => {
				let n = 0;
				ctx.stream.on("data", c => (n += c.length));
				ctx.stream.on("end", () => resolve({ received: n }));
				ctx.stream.on("error", reject);
			});
		},
		download(ctx) {
			const size = Number(ctx.params.size);
			const data = block(CHUNK);
			let left = size;
			ctx.meta.$responseHeaders = { "Content-Length": String(size) };
			return new Readable({
				highWaterMark: CHUNK,
				read() {
					if (left <= 0) return this.push(null);
					const n = Math.min(left, CHUNK);
					left -= n;
					this.push(n === CHUNK ? data : data.subarray(0, n));
				}
			});
		}
	}
};

function makeBroker() {
	return new ServiceBroker({
		nodeID: "web",
		transporter: null,
		logger: false,
		requestTimeout: 0,
		metrics: false,
		tracing: false
	});
}

async function serve() {
	const broker = makeBroker();
	broker.createService(bench);
	const gw = broker.createService({
		name: "api",
		mixins: [ApiGateway],
		settings: {
			port: 0,
			ip: "127.0.0.1",
			logRequest: null,
			logResponse: null,
			log4XXResponses: false,
			logRouteRegistration: null,
			routes: [
				{
					path: "/api",
					logging: false,
					mappingPolicy: "restrict",
					bodyParsers: { json: { limit: "1MB" } },
					aliases: {
						"POST echo": "bench.echo",
						"POST upload": "stream:bench.upload",
						"GET download": "bench.download"
					}
				}
			]
		}
	});
	await broker.start();
	const { port } = gw.server.address();
	process.stdout.write(JSON.stringify({ http: `http://127.0.0.1:${port}` }) + "\n");
	const stop = () => broker.stop().then(() => process.exit(0));
	process.on("SIGTERM", stop);
	process.on("SIGINT", stop);
}

async function direct(count) {
	const broker = makeBroker();
	broker.createService(bench);
	await broker.start();
	for (let i = 0; i < Math.min(count, 2000); i++) await broker.call("bench.echo", PARAMS);
	const t0 = process.hrtime.bigint();
	for (let i = 0; i < count; i++) await broker.call("bench.echo", PARAMS);
	const ns = Number(process.hrtime.bigint() - t0);
	await broker.stop();
	process.stdout.write(JSON.stringify({ calls: count, us_per_call: ns / 1000 / count }) + "\n");
}

const [cmd, ...rest] = process.argv.slice(2);
const countAt = rest.indexOf("--count");
const run = cmd === "direct" ? direct(countAt >= 0 ? Number(rest[countAt + 1]) : 100000) : serve();
run.catch(err => {
	console.error(err);
	process.exit(1);
});

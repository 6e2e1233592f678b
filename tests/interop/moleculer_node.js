// A moleculer.js node for nerve's interop tests, on the NATS transporter. NODE_PATH selects the
// installed moleculer.js: 0.15 (benches/peers/js) or 0.14 (tests/interop/moleculer-0.14).
// Usage: node moleculer_node.js <nodeID> <namespace> [JSON|MsgPack] [disableBalancer: true|false]
// The optional arguments default to the environment (MOLECULER_SERIALIZER,
// MOLECULER_DISABLE_BALANCER), then to JSON and false; MOLECULER_TRANSPORTER overrides the NATS URL.
// Prints {"ready": true} once started; stops on SIGTERM.
"use strict";
const crypto = require("crypto");
const { Readable } = require("stream");
const moleculer = require("moleculer");
const { ServiceBroker, Errors } = moleculer;

// 0.15 speaks protocol 5: a request stream is ctx.stream beside ordinary params (call option
// `stream`). 0.14 speaks protocol 4: the request stream *is* ctx.params.
const STREAM_OPTION = String(moleculer.PROTOCOL_VERSION) !== "4";

const [nodeID, namespace, serializerArg, balancerArg] = process.argv.slice(2);
const serializer = serializerArg || process.env.MOLECULER_SERIALIZER || "JSON";
const disableBalancer = (balancerArg || process.env.MOLECULER_DISABLE_BALANCER || "false") === "true";
if (!["JSON", "MsgPack"].includes(serializer)) throw new Error(`serializer must be JSON or MsgPack, not ${serializer}`);

const received = [];
const broker = new ServiceBroker({
	nodeID,
	namespace,
	transporter: process.env.MOLECULER_TRANSPORTER || "nats://127.0.0.1:4222",
	serializer,
	disableBalancer,
	logger: false,
	heartbeatInterval: 1,
	heartbeatTimeout: 3,
});

broker.createService({
	name: "jsmath",
	actions: {
		add(ctx) {
			ctx.meta.js = "was here";
			return ctx.params.a + ctx.params.b;
		},
		fail(ctx) {
			throw new Errors.MoleculerClientError("js says no", 422, "JS_NO", { why: ctx.params.why });
		},
		async viaPython(ctx) {
			const product = await ctx.call("pymath.mul", { a: ctx.params.a, b: ctx.params.b }, { meta: { asked: "js" } });
			return { product, meta: ctx.meta };
		},
		async pythonError(ctx) {
			try {
				await ctx.call("pymath.fail", {});
			} catch (err) {
				return { name: err.name, code: err.code, type: err.type, data: err.data, message: err.message };
			}
			return null;
		},
		events() {
			return received;
		},
		async callAction(ctx) {
			// For the gateway's test: call any action (an external HTTP service's, say) and show
			// the answer and the meta merged back.
			const response = await ctx.call(ctx.params.action, ctx.params.params, { meta: ctx.params.meta || {} });
			return { response, meta: ctx.meta };
		},
		emitEvent(ctx) {
			return ctx.emit(ctx.params.event, ctx.params.payload);
		},
		async waitFor(ctx) {
			await broker.waitForServices(ctx.params.services, ctx.params.timeout || 20000);
			return true;
		},
	},
	events: {
		"py.hello"(ctx) {
			received.push(ctx.params);
		},
	},
});

// For nerve's tracing test: jstrace.kick starts a call tree of this node's own (Moleculer's
// ids: UUIDs), whose action calls nerve; jstrace.headers shows the headers a call carried.
broker.createService({
	name: "jstrace",
	actions: {
		kick() {
			return broker.call("jstrace.outer");
		},
		async outer(ctx) {
			const where = await ctx.call("pytrace.where");
			return { requestID: ctx.requestID, id: ctx.id, where };
		},
		headers(ctx) {
			return ctx.headers;
		},
	},
});

// Streams, checked by SHA-256 on both sides. The content of a generated stream: the byte at
// offset i is (i * 31 + seed) & 255 (nerve's tests compute the same bytes on their own).
const GEN_CHUNK = 64 * 1024;

function generated(size, seed) {
	let offset = 0;
	return new Readable({
		// not object mode (Readable.from would be): chunks travel as bytes and may be split
		read() {
			if (offset >= size) {
				this.push(null);
				return;
			}
			const n = Math.min(GEN_CHUNK, size - offset);
			const chunk = Buffer.allocUnsafe(n);
			for (let k = 0; k < n; k++) chunk[k] = ((offset + k) * 31 + seed) & 255;
			offset += n;
			this.push(chunk);
		},
	});
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

// Reads a stream to its end: {bytes, sha256}. With slowMs, waits slowMs per 64 KiB read.
async function digest(stream, slowMs) {
	const hash = crypto.createHash("sha256");
	let bytes = 0;
	for await (const chunk of stream) {
		hash.update(chunk);
		bytes += chunk.length;
		if (slowMs > 0) await sleep(slowMs * Math.ceil(chunk.length / GEN_CHUNK));
	}
	return { bytes, sha256: hash.digest("hex") };
}

broker.createService({
	name: "jsstream",
	actions: {
		async upload(ctx) {
			const stream = STREAM_OPTION ? ctx.stream : ctx.params;
			if (!stream || typeof stream.pipe !== "function") {
				throw new Errors.MoleculerClientError("no request stream", 400, "NO_STREAM");
			}
			const params = STREAM_OPTION ? ctx.params : null;
			const slowMs = Number(ctx.meta.slowMs || (params && params.slowMs) || 0);
			const got = await digest(stream, slowMs);
			return { bytes: got.bytes, sha256: got.sha256, meta: ctx.meta, params };
		},
		download(ctx) {
			const size = Number(ctx.params.size);
			ctx.meta.size = size;
			return generated(size, Number(ctx.params.seed || 0));
		},
		failMidway(ctx) {
			const chunks = Number((ctx.params && ctx.params.chunks) || 3);
			let sent = 0;
			return new Readable({
				read() {
					if (sent < chunks) {
						const chunk = Buffer.alloc(GEN_CHUNK, sent & 255);
						sent++;
						this.push(chunk);
					} else {
						// later, so that the chunks before are sent first
						setTimeout(() => this.destroy(new Errors.MoleculerError("broken on purpose", 500, "BROKEN")), 50);
					}
				},
			});
		},
		callPyUpload(ctx) {
			const { action, size, seed } = ctx.params;
			const stream = generated(Number(size), Number(seed || 0));
			if (STREAM_OPTION) return ctx.call(action, { size }, { stream, meta: { size } });
			return ctx.call(action, stream, { meta: { size } });
		},
		async callPyDownload(ctx) {
			const { action, size, seed } = ctx.params;
			const stream = await ctx.call(action, { size, seed });
			if (!stream || typeof stream.pipe !== "function") {
				throw new Errors.MoleculerClientError("nerve answered no stream", 500, "NO_STREAM", { answer: stream });
			}
			const got = await digest(stream, 0);
			return { bytes: got.bytes, sha256: got.sha256, meta: ctx.meta };
		},
	},
});

// With the balancer disabled, the node takes requests and events only from the queue groups it
// subscribes to (REQB.<action>, EVENTB.<group>.<event>) just before it broadcasts its INFO, about
// a second after start() (localServiceChanged is debounced), while its INFO sent in answer to
// a DISCOVER already lists the services. A call published between the two is dropped by NATS
// and times out; so this node is ready once that broadcast is out.
const announced = new Promise(resolve => {
	if (!disableBalancer) return resolve();
	const discoverer = broker.registry.discoverer;
	const sendLocalNodeInfo = discoverer.sendLocalNodeInfo.bind(discoverer);
	discoverer.sendLocalNodeInfo = nodeID => {
		const sent = sendLocalNodeInfo(nodeID);
		const services = broker.getLocalNodeInfo().services || [];
		if (!nodeID && services.some(s => s.name === "jsstream")) sent.then(resolve);
		return sent;
	};
});

broker
	.start()
	.then(() => announced)
	.then(() => console.log(JSON.stringify({ ready: true })));
process.on("SIGTERM", () => broker.stop().then(() => process.exit(0)));

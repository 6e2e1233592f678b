"use strict";
// Shared by server.js and client.js: options, broker construction, result lines.
const { ServiceBroker } = require("moleculer");
const fs = require("fs");

const PARAMS = { id: 1, name: "bench", tags: ["a", "b", "c"], values: [1, 2, 3, 4], nested: { ok: true, ratio: 0.5 } };

function parseArgs(argv) {
	const opts = {
		mode: argv[0], host: "127.0.0.1", port: 0, transport: "tcp", serializer: "JSON",
		namespace: "", scenario: "rpc", inflight: 1, count: 10000, duration: 3, warmup: 500, timeout: 0,
		size: 64 * 1024 * 1024, chunk: 256 * 1024, rate: 0, deadline: 120, nats: "nats://127.0.0.1:4222"
	};
	for (let i = 1; i < argv.length; i += 2) {
		const key = argv[i].replace(/^--/, "");
		if (!(key in opts)) throw new Error(`unknown option ${argv[i]}`);
		const v = argv[i + 1];
		opts[key] = typeof opts[key] === "number" ? Number(v) : v;
	}
	return opts;
}

function makeBroker(nodeID, opts, { listenPort, seed }) {
	let transporter;
	if (opts.transport === "tcp") {
		transporter = {
			type: "TCP",
			options: {
				udpDiscovery: false,
				port: listenPort,
				urls: seed ? [seed] : [],
				maxPacketSize: 64 * 1024 * 1024
			}
		};
	} else {
		transporter = { type: "NATS", options: { url: opts.nats } };
	}
	return new ServiceBroker({
		nodeID,
		namespace: opts.namespace,
		transporter,
		serializer: opts.serializer,
		logger: false,
		requestTimeout: 0,
		metrics: false,
		tracing: false,
		maxChunkSize: opts.chunk,
		// 0.15 caps pending requests per broker at 50k; 64 in flight is far below
	});
}

function statusKb(field) {
	try {
		const m = fs.readFileSync("/proc/self/status", "utf8").match(new RegExp(`${field}:\\s+(\\d+)`));
		return m ? Number(m[1]) : 0;
	} catch (_) {
		return 0;
	}
}

function emitLine(obj) {
	process.stdout.write(JSON.stringify(obj) + "\n");
}

function makeBlock(chunk) {
	const block = Buffer.alloc(chunk);
	for (let i = 0; i < chunk; i++) block[i] = i & 0xff;
	return block;
}

module.exports = { PARAMS, parseArgs, makeBroker, statusKb, emitLine, makeBlock };

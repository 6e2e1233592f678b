"use strict";
// moleculer.js 0.15 benchmark server: echo, counter (event + count), file (stream upload/download).
//   node server.js server --transport tcp|nats --serializer JSON|MsgPack --port P --namespace NS
const { Readable } = require("stream");
const { parseArgs, makeBroker, emitLine, makeBlock } = require("./common");

const opts = parseArgs(process.argv.slice(2));
const broker = makeBroker("bench-server", opts, { listenPort: opts.port || null, seed: null });
let received = 0;

broker.createService({
	name: "echo",
	actions: { echo: ctx => ctx.params }
});

broker.createService({
	name: "counter",
	events: {
		"bench.tick"() {
			received++;
		}
	},
	actions: { count: () => received }
});

broker.createService({
	name: "file",
	actions: {
		save(ctx) {
			return new Promise((resolve, reject) => {
				let n = 0;
				ctx.stream.on("data", c => (n += c.length));
				ctx.stream.on("end", () => resolve(n));
				ctx.stream.on("error", reject);
			});
		},
		get(ctx) {
			const { size, chunk } = ctx.params;
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
	}
});

broker.start().then(() => {
	emitLine({ ready: true, port: opts.port });
	setTimeout(() => broker.stop().then(() => process.exit(0)), opts.deadline * 1000).unref();
	setInterval(() => {}, 1 << 30);
}).catch(err => {
	console.error(err);
	process.exit(1);
});

// A moleculer.js 0.15 node for nerve's interop tests: NATS transporter, JSON serializer.
// Usage: node moleculer_node.js <nodeID> <namespace>
"use strict";
const { ServiceBroker, Errors } = require("moleculer");

const [nodeID, namespace] = process.argv.slice(2);
const received = [];
const broker = new ServiceBroker({
	nodeID,
	namespace,
	transporter: "nats://127.0.0.1:4222",
	serializer: "JSON",
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

broker.start().then(() => console.log(JSON.stringify({ ready: true })));
process.on("SIGTERM", () => broker.stop().then(() => process.exit(0)));

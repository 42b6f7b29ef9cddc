// One device's matrix-js-sdk sync loop, driven by tests/integration/test_history_clients.py.
//
// Environment: HS_URL, USER_ID, ACCESS_TOKEN, DEVICE_ID, ROOM_ID.
// Prints one JSON object per line on stdout, each after the prefix "MLF-REPORT "
// (other lines are the SDK's own logging):
//   {"phase": "joined", ...}   the loop shows ROOM_ID joined; the loop is then stopped
//                              (the device goes offline, keeping its store and token)
//   after reading "resume" on stdin, the same client starts its loop again:
//   {"phase": "done", ...}     the loop shows the user no longer joined (or timed out)
// Each object has the room's membership, the events of its live timeline, every
// event the client emitted for the room since the last phase, and the /sync
// requests the loop sent (their query strings).

import { createInterface } from "node:readline";

// The SDK logs through console; keep stdout for the reports (imports below are
// dynamic so that they bind to the patched console).
for (const level of ["log", "info", "debug", "warn", "trace"]) {
    console[level] = console.error;
}
const { ClientEvent, createClient, MemoryStore } = await import("matrix-js-sdk");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
logger.setLevel("error");

// A store that, like the SDK's persistent stores, hands its sync token back when
// the loop starts again, so that the device resumes from where it stopped
// instead of syncing from scratch. (MemoryStore keeps the rooms it has seen.)
class ResumingStore extends MemoryStore {
    getSavedSyncToken() {
        return Promise.resolve(this.getSyncToken());
    }
}

const env = process.env;
const roomId = env.ROOM_ID;
const syncs = [];
const seen = [];

const fetchFn = (url, init) => {
    const u = new URL(url);
    if (u.pathname.endsWith("/sync")) {
        syncs.push(u.search);
    }
    return fetch(url, init);
};

const client = createClient({
    baseUrl: env.HS_URL,
    userId: env.USER_ID,
    accessToken: env.ACCESS_TOKEN,
    deviceId: env.DEVICE_ID,
    store: new ResumingStore(),
    fetchFn,
});

client.on(ClientEvent.Event, (event) => {
    if (event.getRoomId() === roomId) {
        seen.push(describe(event));
    }
});

function describe(event) {
    const content = event.getContent();
    return {
        event_id: event.getId(),
        type: event.getType(),
        state_key: event.getStateKey() ?? null,
        membership: content.membership ?? null,
        label: content["mlf.label"] ?? null,
    };
}

function report(phase) {
    const room = client.getRoom(roomId);
    const out = {
        phase,
        membership: room ? room.getMyMembership() : null,
        timeline: room ? room.getLiveTimeline().getEvents().map(describe) : [],
        seen: seen.splice(0),
        syncs: syncs.splice(0),
        sync_token: client.store.getSyncToken(),
    };
    process.stdout.write("MLF-REPORT " + JSON.stringify(out) + "\n");
}

async function until(predicate, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    while (!predicate()) {
        const left = deadline - Date.now();
        if (left <= 0) {
            return false;
        }
        await new Promise((resolve) => {
            const timer = setTimeout(resolve, left);
            client.once(ClientEvent.Sync, () => {
                clearTimeout(timer);
                resolve();
            });
        });
    }
    return true;
}

const membership = () => client.getRoom(roomId)?.getMyMembership();

await client.startClient({ initialSyncLimit: 50, pollTimeout: 1000 });
await until(() => membership() === "join", 30000);
report("joined");
client.stopClient();

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
    if (line.trim() === "resume") {
        break;
    }
}
await client.startClient({ initialSyncLimit: 50, pollTimeout: 1000 });
await until(() => membership() !== undefined && membership() !== "join", 30000);
report("done");
client.stopClient();
process.exit(0);

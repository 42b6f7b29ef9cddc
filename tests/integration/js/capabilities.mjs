// matrix-js-sdk reading GET /capabilities, driven by tests/integration/test_capabilities.py.
//
// Environment: HS_URL, USER_ID, ACCESS_TOKEN.
// Prints one line, "MLF-REPORT " and a JSON object: the forget-on-leave
// capability as the SDK hands it to an application (null when absent), and the
// paths of the requests the SDK sent.

for (const level of ["log", "info", "debug", "warn", "trace"]) {
    console[level] = console.error;
}
const { createClient } = await import("matrix-js-sdk");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
logger.setLevel("error");

const env = process.env;
const paths = [];
const fetchFn = (url, init) => {
    paths.push(new URL(url).pathname);
    return fetch(url, init);
};
const client = createClient({
    baseUrl: env.HS_URL,
    userId: env.USER_ID,
    accessToken: env.ACCESS_TOKEN,
    fetchFn,
});
const capabilities = await client.getCapabilities();
const report = {
    phase: "capabilities",
    forget_forced_upon_leave: capabilities["m.forget_forced_upon_leave"] ?? null,
    room_versions: capabilities["m.room_versions"] ?? null,
    paths,
};
process.stdout.write("MLF-REPORT " + JSON.stringify(report) + "\n");

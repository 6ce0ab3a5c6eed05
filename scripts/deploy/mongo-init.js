// Run by docker-compose.yml's mongo-init service, on mongo-1's localhost, with mongosh:
// initiates the replica set rs0 of mongo-1, mongo-2 and mongo-3 and creates the root user and
// the gateways' user (readWrite and indexes on the rxledger database). Idempotent: on later runs
// it authenticates as root and only checks. The passwords are Docker secrets.
const fs = require("fs");
const secret = (name) => fs.readFileSync(`/run/secrets/${name}`, "utf8").replace(/\r?\n$/, "");
const rootPassword = secret("mongo_root_password");
const appPassword = secret("mongo_app_password");
const admin = db.getSiblingDB("admin");

function authenticated() {
  try {
    return admin.auth("root", rootPassword).ok === 1;
  } catch (e) {
    return false; // no users yet: the localhost exception applies
  }
}

let asRoot = authenticated();
try {
  rs.status();
} catch (e) {
  if (e.codeName !== "NotYetInitialized") throw e;
  rs.initiate({
    _id: "rs0",
    members: [
      { _id: 0, host: "mongo-1:27017", priority: 2 },
      { _id: 1, host: "mongo-2:27017", priority: 1 },
      { _id: 2, host: "mongo-3:27017", priority: 1 },
    ],
  });
  print("mongo-init: initiated replica set rs0");
}
for (let i = 0; !db.hello().isWritablePrimary; i++) {
  if (i === 120) throw new Error("mongo-1 did not become primary within 120 s");
  sleep(1000);
}
if (!asRoot) {
  admin.createUser({ user: "root", pwd: rootPassword, roles: ["root"] });
  asRoot = authenticated();
  print("mongo-init: created the root user");
}
const rxledger = db.getSiblingDB("rxledger");
if (rxledger.getUser("rxledger") === null) {
  rxledger.createUser({
    user: "rxledger",
    pwd: appPassword,
    roles: [{ role: "dbOwner", db: "rxledger" }],
    writeConcern: { w: "majority", j: true },
  });
  print("mongo-init: created the user rxledger");
}
print("mongo-init: replica set rs0 ready: " + rs.status().members.map((m) => `${m.name} ${m.stateStr}`).join(", "));

// A clock for the hot paths: Date.now() costs ~40 ns, more than a whole record. Within one
// synchronous run of the event loop it is read once per 256 records; every new task or
// microtask checkpoint reads it afresh. Pass ts_ms when records of one synchronous loop are
// spread over more than a bucket.

let clockMs = 0;
let clockLeft = 0;
let clockArmed = false;
const clockExpire = () => {
  clockLeft = 0;
  clockArmed = false;
};

/** @internal Now, in ms, read at most once per 256 calls within one synchronous run. */
export function clock(): number {
  if (clockLeft > 0) {
    clockLeft--;
    return clockMs;
  }
  clockMs = Date.now();
  clockLeft = 255;
  if (!clockArmed) {
    clockArmed = true;
    queueMicrotask(clockExpire);
  }
  return clockMs;
}

// Drives the web console in a real browser (Debian's chromium, headless, through
// playwright-core): the page loads with no console errors and lists the model, a chat message
// gets an answer, a tiny job started from the page draws its curves and publishes versions, and
// rollback changes the live version. Run by tests/console.rs as
// `node console.mjs BASE_URL SCREENSHOT.png`; exits non-zero on the first failed check.
import { chromium } from "playwright-core";

const [base, screenshot] = process.argv.slice(2);
const executablePath = process.env.MEZO_TEST_CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  page.on("console", (message) => {
    if (message.type() === "error") errors.push(message.text());
  });
  page.on("pageerror", (error) => errors.push(String(error)));
  page.setDefaultTimeout(120_000);

  await page.goto(`${base}/console`);
  await page.waitForFunction(() => document.getElementById("model").textContent.includes("smollm2"));
  console.log("ok the console lists the model:", await page.textContent("#model"));

  await page.click("#send");
  await page.waitForFunction(() => {
    const answer = document.getElementById("answer").textContent;
    return answer && answer !== "…";
  });
  const answeredBy = await page.textContent("#answered-by");
  if (!answeredBy.includes("base model")) throw new Error(`chat answered by: ${answeredBy}`);
  console.log("ok a chat message got an answer:", JSON.stringify(await page.textContent("#answer")));

  await page.fill("#job-adapter", "console-test");
  await page.fill("#job-steps", "4");
  await page.fill("#job-publish", "2");
  await page.click("#start-job");
  await page.waitForFunction(() => {
    const row = document.querySelector('#jobs tr[data-job]');
    return row && row.textContent.includes("succeeded");
  });
  await page.waitForFunction(() => {
    const svg = document.querySelector("#curves svg");
    return svg && svg.textContent.includes("train loss") && svg.querySelectorAll("polyline").length >= 2;
  });
  await page.waitForFunction(() => {
    const live = document.querySelector('#adapters tr[data-adapter="console-test"] td[data-live]');
    return live && live.dataset.live === "2";
  });
  console.log("ok the job drew its curves and published versions 1 and 2");

  await page.click('#adapters tr[data-adapter="console-test"] button:has-text("roll back to v1")');
  await page.waitForFunction(() => {
    const live = document.querySelector('#adapters tr[data-adapter="console-test"] td[data-live]');
    return live && live.dataset.live === "1";
  });
  console.log("ok rollback made version 1 live");

  await page.selectOption("#chat-model", "console-test");
  await page.click("#send");
  await page.waitForFunction(() => document.getElementById("answered-by").textContent.includes("version 1"));
  console.log("ok the adapter answers as version 1:", await page.textContent("#answered-by"));

  await page.screenshot({ path: screenshot, fullPage: true });
  if (errors.length) throw new Error(`the page logged errors: ${errors.join("; ")}`);
  console.log("ok no console errors");
} finally {
  await browser.close();
}

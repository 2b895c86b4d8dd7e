// The staff chat page: plain JavaScript, no framework, nothing loaded from anywhere but this server.
// Everything the model (or the server) says is put on the page as text (textContent, text nodes),
// never parsed as HTML. The API key lives in sessionStorage only: never in a URL, a cookie or a log.
"use strict";

(() => {
  const KEY = "appliance.apiKey";
  const API = "../v1/"; // relative: the page is /chat/, the API beside it, whatever host and port serve them
  const NO_ANSWER = "The appliance did not answer. Check that you are on the site network, then try again.";
  const REFUSED = "That key was not accepted: it is unknown or has been revoked. " +
    "Ask your administrator for a key (appliance keys create --role user).";

  const TOO_LONG = "This conversation is now longer than the model can read at once. " +
    "Start a new conversation (the button at the top) and ask again.";

  const $ = (id) => document.getElementById(id);
  const state = { base: null, history: [], busy: false };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function say(node, text) {
    node.textContent = text || "";
    node.hidden = !text;
  }

  async function api(path, options = {}, key = sessionStorage.getItem(KEY)) {
    const headers = { Authorization: `Bearer ${key}` };
    if (options.body) headers["Content-Type"] = "application/json";
    return fetch(API + path, { ...options, headers, credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer" });
  }

  // The server's error ({message, code}) from a response that is not ok.
  async function apiError(response) {
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error.message === "string") return body.error;
    } catch (_) { /* not JSON: fall through */ }
    return { message: `The server answered ${response.status} ${response.statusText}.`, code: null };
  }

  async function errorText(response) {
    return (await apiError(response)).message;
  }

  // --- the key ---------------------------------------------------------------------------------
  function showLogin(message) {
    $("chat").hidden = true;
    $("logout").hidden = true;
    $("new-chat").hidden = true;
    $("login").hidden = false;
    say($("login-error"), message);
    $("key").focus();
  }

  function showChat() {
    $("login").hidden = true;
    $("chat").hidden = false;
    $("logout").hidden = false;
    $("new-chat").hidden = false;
    say($("login-error"), "");
    $("question").focus();
  }

  function forget(message) {
    sessionStorage.removeItem(KEY);
    state.base = null;
    showLogin(message);
  }

  // Checks the key with GET /v1/models, which also names the base model (to tell an adapter apart).
  async function logIn(key) {
    let response;
    try {
      response = await api("models", {}, key);
    } catch (_) {
      return NO_ANSWER;
    }
    if (response.status === 401) return REFUSED;
    if (!response.ok) return await errorText(response);
    const cards = (await response.json()).data || [];
    const base = cards.find((c) => !c.parent) || cards[0];
    state.base = base ? base.id : null;
    sessionStorage.setItem(KEY, key);
    showChat();
    return null;
  }

  // --- the conversation ------------------------------------------------------------------------
  function addMessage(role, text) {
    const item = el("li", `message ${role}`);
    item.append(el("div", "who", role === "user" ? "You" : "Appliance"));
    const body = el("div", "text");
    const node = document.createTextNode(text);
    body.append(node);
    item.append(body);
    $("messages").append(item);
    item.scrollIntoView({ block: "end" });
    return { item, node };
  }

  function answeredBy(model) {
    if (state.base && model.startsWith(`${state.base}:`)) {
      return `Answered by ${state.base} with adapter ${model.slice(state.base.length + 1)}`;
    }
    return `Answered by ${model} (base model, no adapter)`;
  }

  // Reads the server-sent events of a streamed answer; calls onChunk with each JSON chunk.
  async function readEvents(response, onChunk) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data === "[DONE]") return true;
        if (data) onChunk(JSON.parse(data));
      }
    }
  }

  async function ask(question) {
    state.history.push({ role: "user", content: question });
    addMessage("user", question);
    const reply = addMessage("assistant", "");
    reply.item.classList.add("streaming");
    const answer = { id: null, model: null, text: "" };
    let complete = false;
    try {
      const response = await api("chat/completions", {
        method: "POST", body: JSON.stringify({ messages: state.history, stream: true }),
      });
      if (response.status === 401) {
        state.history.pop();
        reply.item.remove();
        forget(REFUSED);
        return;
      }
      if (!response.ok) {
        const error = await apiError(response);
        throw new Error(error.code === "context_length_exceeded" ? TOO_LONG : error.message);
      }
      complete = await readEvents(response, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message);
        answer.id = chunk.id || answer.id;
        answer.model = chunk.model || answer.model;
        const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (piece) {
          answer.text += piece;
          reply.node.appendData(piece);
        }
      });
      if (!complete) throw new Error("The answer was cut off before it finished; ask again.");
    } catch (e) {
      reply.item.append(el("p", "error", e instanceof TypeError ? NO_ANSWER : e.message));
    } finally {
      reply.item.classList.remove("streaming");
    }
    if (!complete) {
      state.history.pop();
      return;
    }
    state.history.push({ role: "assistant", content: answer.text });
    reply.item.append(el("div", "meta", answeredBy(answer.model)));
    reply.item.append(feedbackControls(answer));
  }

  // --- feedback: reaches the feedback store, and from there the nightly training ----------------
  function feedbackControls(answer) {
    const box = el("div", "feedback");
    const actions = el("div", "actions");
    const up = el("button", "rate-up", "👍 Good");
    const down = el("button", "rate-down", "👎 Bad");
    const correct = el("button", "correct", "Correct this answer");
    up.title = "A good answer";
    down.title = "A bad answer";
    const status = el("span", "status");
    status.setAttribute("role", "status");
    actions.append(up, down, correct, status);

    const form = el("form", "correction");
    form.hidden = true;
    const label = el("label", null, "The answer it should have given");
    const text = el("textarea");
    text.rows = 4;
    text.required = true;
    text.id = `correction-${answer.id}`;
    label.htmlFor = text.id;
    const sendCorrection = el("button", null, "Send correction");
    sendCorrection.type = "submit";
    form.append(label, text, sendCorrection);
    for (const b of [up, down, correct]) b.type = "button";

    const buttons = [up, down, correct, sendCorrection];
    async function send(rating, corrected, chosen) {
      buttons.forEach((b) => { b.disabled = true; });
      const message = await postFeedback(answer.id, rating, corrected);
      status.textContent = message.text;
      status.classList.toggle("failed", !message.ok);
      // The server takes one rating (or correction) per answer: after it, this reply's buttons are done.
      buttons.forEach((b) => { b.disabled = message.ok; });
      if (message.ok) {
        chosen.classList.add("chosen");
        form.hidden = true;
        if (corrected) box.append(el("div", "sent-correction", `Your correction: ${corrected}`));
      }
    }
    up.addEventListener("click", () => send(1, null, up));
    down.addEventListener("click", () => send(-1, null, down));
    correct.addEventListener("click", () => {
      form.hidden = !form.hidden;
      if (!form.hidden) {
        if (!text.value) text.value = answer.text;
        text.focus();
      }
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const corrected = text.value.trim();
      if (corrected) send(-1, corrected, correct);
    });
    box.append(actions, form);
    return box;
  }

  async function postFeedback(requestId, rating, corrected) {
    const body = { request_id: requestId, rating };
    if (corrected) body.corrected = corrected;
    let response;
    try {
      response = await api("feedback", { method: "POST", body: JSON.stringify(body) });
    } catch (_) {
      return { ok: false, text: NO_ANSWER };
    }
    if (response.status === 401) {
      forget(REFUSED);
      return { ok: false, text: REFUSED };
    }
    if (!response.ok) return { ok: false, text: await errorText(response) };
    const ack = await response.json().catch(() => ({}));
    return {
      ok: true,
      text: ack.status === "held" ? "Thank you: an administrator checks corrections before the nightly training uses them."
        : "Thank you: it goes to the nightly training.",
    };
  }

  // --- wiring ----------------------------------------------------------------------------------
  function start() {
    $("login-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const input = $("key");
      const key = input.value.trim();
      if (!key) return;
      say($("login-error"), "");
      const problem = await logIn(key);
      if (problem) {
        showLogin(problem);
      } else {
        input.value = "";
      }
    });
    const newConversation = () => {
      state.history = [];
      $("messages").replaceChildren();
    };
    $("logout").addEventListener("click", () => {
      newConversation();
      forget("");
    });
    $("new-chat").addEventListener("click", () => {
      newConversation();
      $("question").focus();
    });
    $("ask-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const question = $("question").value.trim();
      if (!question || state.busy) return;
      state.busy = true;
      $("send").disabled = true;
      $("question").value = "";
      try {
        await ask(question);
      } finally {
        state.busy = false;
        $("send").disabled = false;
      }
    });
    $("question").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("ask-form").requestSubmit();
      }
    });
    const key = sessionStorage.getItem(KEY);
    if (key) {
      logIn(key).then((problem) => { if (problem) forget(problem); });
    } else {
      showLogin("");
    }
  }

  start();
})();
